// SPDX-License-Identifier: GPL-2.0-only
/*
 * kstack LABEL PLACES -- COMMAND [ARG...]: run COMMAND with an execute hardware breakpoint
 * at each kernel code place PLACES names (comma-separated, up to four: NAME or MODULE:NAME,
 * with an optional +0xOFFSET, looked up in /proc/kallsyms, so a module's local symbols
 * work), and print the kernel stack the running kernel's own unwinder (ORC on Debian's
 * kernels) walks each time one is hit: perf_event_open(PERF_TYPE_BREAKPOINT) with
 * PERF_SAMPLE_CALLCHAIN, system-wide on CPU 0, so the kernel threads COMMAND wakes (e.g.
 * a crypto self-test) are sampled too.  Unlike a tracefs kprobe, a breakpoint needs no
 * ftrace entry in the function (an injected thunk has none); like a kprobe, it is refused
 * in noinstr code (EINVAL).
 *
 * Output on /dev/kmsg, one record per line, each distinct stack once:
 *   PVQ-STACK LABEL K PLACE hits=N frames=M
 *   PVQ-FRAME LABEL K I ADDRESS NAME+0xOFF [MODULE]     (I = 0: the breakpoint's own ip)
 *   PVQ-STACK-END LABEL samples=N lost=L rc=RC
 * Names come from /proc/kallsyms read after COMMAND (module symbols, local ones included).
 * Exits with COMMAND's status.  Built static by tests/qemu/harness.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/hw_breakpoint.h>
#include <linux/perf_event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_EVENTS 4		/* x86 has four debug address registers */
#define MAX_STACKS 64		/* distinct stacks kept per run */
#define MAX_FRAMES 128
#define DATA_PAGES 256		/* ring buffer: 1 MiB per event */

struct stack {
	int event;
	unsigned long hits;
	unsigned nr;
	uint64_t ips[MAX_FRAMES];
};

struct ksym {
	uint64_t addr;
	char *name;
	char *module;
};

static FILE *out;
static struct stack stacks[MAX_STACKS];
static int nstacks;
static struct ksym *syms;
static size_t nsyms, capsyms;

static int by_addr(const void *a, const void *b)
{
	const struct ksym *x = a, *y = b;

	return x->addr < y->addr ? -1 : x->addr > y->addr;
}

/* Text symbols of /proc/kallsyms (vmlinux and modules), sorted by address. */
static void load_kallsyms(void)
{
	FILE *f = fopen("/proc/kallsyms", "r");
	char line[512], name[256], module[128], type;
	unsigned long long addr;

	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		module[0] = 0;
		if (sscanf(line, "%llx %c %255s [%127[^]]]", &addr, &type, name, module) < 3)
			continue;
		if (type != 't' && type != 'T' && type != 'w' && type != 'W')
			continue;
		if (nsyms == capsyms) {
			capsyms = capsyms ? 2 * capsyms : 65536;
			syms = realloc(syms, capsyms * sizeof(*syms));
			if (!syms)
				exit(111);
		}
		syms[nsyms].addr = addr;
		syms[nsyms].name = strdup(name);
		syms[nsyms].module = module[0] ? strdup(module) : NULL;
		nsyms++;
	}
	fclose(f);
	qsort(syms, nsyms, sizeof(*syms), by_addr);
}

/*
 * The address of a code place: "NAME" (vmlinux), "MODULE:NAME" (a module's symbol, local
 * ones too), either with "+0xOFFSET".  0 when /proc/kallsyms has no such symbol.
 */
static uint64_t lookup_place(const char *place)
{
	char want[256], module[256] = "", line[512], name[256], mod[256], type, *plus, *colon;
	unsigned long long addr, offset = 0;
	uint64_t found = 0;
	FILE *f;

	snprintf(want, sizeof(want), "%s", place);
	plus = strchr(want, '+');
	if (plus) {
		*plus = 0;
		offset = strtoull(plus + 1, NULL, 0);
	}
	colon = strchr(want, ':');
	if (colon) {
		*colon = 0;
		snprintf(module, sizeof(module), "%s", want);
		memmove(want, colon + 1, strlen(colon + 1) + 1);
	}
	f = fopen("/proc/kallsyms", "r");
	if (!f)
		return 0;
	while (!found && fgets(line, sizeof(line), f)) {
		mod[0] = 0;
		if (sscanf(line, "%llx %c %255s [%255[^]]]", &addr, &type, name, mod) >= 3 &&
		    !strcmp(name, want) && !strcmp(mod, module))
			found = addr + offset;
	}
	fclose(f);
	return found;
}

static const struct ksym *symbolize(uint64_t addr)
{
	size_t lo = 0, hi = nsyms;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;

		if (syms[mid].addr <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo ? &syms[lo - 1] : NULL;
}

static void keep(int event, const uint64_t *ips, uint64_t nr)
{
	struct stack s = { .event = event, .hits = 1 };

	for (uint64_t i = 0; i < nr && s.nr < MAX_FRAMES; i++)
		if (ips[i] < PERF_CONTEXT_MAX)	/* skip PERF_CONTEXT_KERNEL and the like */
			s.ips[s.nr++] = ips[i];
	for (int k = 0; k < nstacks; k++)
		if (stacks[k].event == event && stacks[k].nr == s.nr &&
		    !memcmp(stacks[k].ips, s.ips, s.nr * sizeof(s.ips[0]))) {
			stacks[k].hits++;
			return;
		}
	if (nstacks < MAX_STACKS)
		stacks[nstacks++] = s;
}

/* Every PERF_RECORD_SAMPLE (sample_type IP | CALLCHAIN) in one event's ring buffer. */
static void drain(int event, void *base, unsigned long *samples, unsigned long *lost)
{
	struct perf_event_mmap_page *meta = base;
	unsigned char *data = (unsigned char *)base + meta->data_offset;
	uint64_t size = meta->data_size, tail = meta->data_tail, head = meta->data_head;
	unsigned char rec[sizeof(uint64_t) * (MAX_FRAMES + 8) + 4096];

	__sync_synchronize();
	while (tail < head) {
		struct perf_event_header hdr;

		for (size_t i = 0; i < sizeof(hdr); i++)
			((unsigned char *)&hdr)[i] = data[(tail + i) % size];
		if (hdr.size < sizeof(hdr) || hdr.size > sizeof(rec))
			break;
		for (size_t i = 0; i < hdr.size; i++)
			rec[i] = data[(tail + i) % size];
		if (hdr.type == PERF_RECORD_SAMPLE) {
			uint64_t *w = (uint64_t *)(rec + sizeof(hdr));	/* ip, nr, ips[nr] */

			(*samples)++;
			if (w[1] <= (hdr.size - sizeof(hdr)) / 8 - 2)
				keep(event, &w[2], w[1]);
		} else if (hdr.type == PERF_RECORD_LOST) {
			*lost += ((uint64_t *)(rec + sizeof(hdr)))[1];
		}
		tail += hdr.size;
	}
	meta->data_tail = tail;
}

int main(int argc, char **argv)
{
	int fds[MAX_EVENTS], nevents = 0, status = 0, rc;
	void *maps[MAX_EVENTS];
	char *names[MAX_EVENTS], *label, *list, *tok, *save = NULL;
	long page = sysconf(_SC_PAGESIZE);
	unsigned long samples = 0, lost = 0;
	pid_t child;

	if (argc < 5 || strcmp(argv[3], "--")) {
		fputs("usage: kstack LABEL PLACE[,PLACE...] -- COMMAND [ARG...]\n", stderr);
		return 2;
	}
	out = fopen("/dev/kmsg", "w");
	if (!out)
		out = stdout;
	setvbuf(out, NULL, _IOLBF, 0); /* one write per line: one kmsg record each */
	label = argv[1];
	list = strdup(argv[2]);
	for (tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		struct perf_event_attr attr = {
			.type = PERF_TYPE_BREAKPOINT,
			.size = sizeof(attr),
			.bp_type = HW_BREAKPOINT_X,
			.bp_len = sizeof(long),
			.sample_period = 1,
			.sample_type = PERF_SAMPLE_IP | PERF_SAMPLE_CALLCHAIN,
			.exclude_callchain_user = 1,
			.disabled = 1,
		};
		int fd;

		if (nevents == MAX_EVENTS) {
			fprintf(out, "PVQ-STACK-END %s fail too-many-places-%s\n", label, tok);
			continue;
		}
		attr.bp_addr = lookup_place(tok);
		if (!attr.bp_addr) {
			fprintf(out, "PVQ-STACK-END %s fail no-symbol-%s\n", label, tok);
			continue;
		}
		fd = syscall(SYS_perf_event_open, &attr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC);
		if (fd < 0) {
			fprintf(out, "PVQ-STACK-END %s fail perf_event_open-%s-%d\n", label, tok,
				errno);
			continue;
		}
		maps[nevents] = mmap(NULL, (1 + DATA_PAGES) * page, PROT_READ | PROT_WRITE,
				     MAP_SHARED, fd, 0);
		if (maps[nevents] == MAP_FAILED) {
			fprintf(out, "PVQ-STACK-END %s fail mmap-%d\n", label, errno);
			close(fd);
			continue;
		}
		names[nevents] = tok;
		fds[nevents++] = fd;
	}
	for (int i = 0; i < nevents; i++)
		ioctl(fds[i], PERF_EVENT_IOC_ENABLE, 0);
	child = fork();
	if (child == 0) {
		execvp(argv[4], &argv[4]);
		_exit(127);
	}
	while (child > 0 && waitpid(child, &status, 0) < 0 && errno == EINTR)
		;
	for (int i = 0; i < nevents; i++) {
		ioctl(fds[i], PERF_EVENT_IOC_DISABLE, 0);
		drain(i, maps[i], &samples, &lost);
	}
	rc = child < 0 ? 126 : WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
	load_kallsyms();
	for (int k = 0; k < nstacks; k++) {
		struct stack *s = &stacks[k];

		fprintf(out, "PVQ-STACK %s %d %s hits=%lu frames=%u\n", label, k, names[s->event],
			s->hits, s->nr);
		for (unsigned i = 0; i < s->nr; i++) {
			const struct ksym *sym = symbolize(s->ips[i]);

			if (!sym)
				fprintf(out, "PVQ-FRAME %s %d %u %" PRIx64 " ?\n", label, k, i,
					s->ips[i]);
			else
				fprintf(out, "PVQ-FRAME %s %d %u %" PRIx64 " %s+0x%" PRIx64 "%s%s%s\n",
					label, k, i, s->ips[i], sym->name, s->ips[i] - sym->addr,
					sym->module ? " [" : "", sym->module ? sym->module : "",
					sym->module ? "]" : "");
		}
	}
	fprintf(out, "PVQ-STACK-END %s samples=%lu lost=%lu rc=%d\n", label, samples, lost, rc);
	return rc;
}
