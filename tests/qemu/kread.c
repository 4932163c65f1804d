// SPDX-License-Identifier: GPL-2.0-only
/*
 * kread LIST: print the bytes the running kernel holds at each place LIST names, read
 * through /proc/kcore, one "PVQ-READ label address hex" line each on /dev/kmsg (or
 * "PVQ-READ label fail why").  Each LIST line is "label module section offset length": a module
 * site is at /sys/module/MODULE/sections/SECTION + offset; module "-" means offset is a
 * kernel virtual address (a vmlinux site at its link address, booted with nokaslr).
 * Built static by tests/qemu/harness.py (the initramfs has no libc).
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static Elf64_Phdr *phdrs;
static int nphdrs;
static int kcore = -1;
static FILE *out;

/* The program headers of /proc/kcore, which is ELF64 on x86-64 and ELF32 on i386. */
static int load_kcore(void)
{
	Elf64_Ehdr eh;
	Elf32_Ehdr eh32;

	kcore = open("/proc/kcore", O_RDONLY | O_CLOEXEC);
	if (kcore < 0 || pread(kcore, &eh, sizeof(eh), 0) != sizeof(eh) ||
	    memcmp(eh.e_ident, ELFMAG, SELFMAG))
		return -1;
	if (eh.e_ident[EI_CLASS] == ELFCLASS64) {
		nphdrs = eh.e_phnum;
		phdrs = calloc(nphdrs, sizeof(*phdrs));
		if (!phdrs || pread(kcore, phdrs, nphdrs * sizeof(*phdrs), eh.e_phoff) !=
		    (ssize_t)(nphdrs * sizeof(*phdrs)))
			return -1;
		return 0;
	}
	memcpy(&eh32, &eh, sizeof(eh32));
	nphdrs = eh32.e_phnum;
	phdrs = calloc(nphdrs, sizeof(*phdrs));
	if (!phdrs)
		return -1;
	for (int i = 0; i < nphdrs; i++) {
		Elf32_Phdr p;

		if (pread(kcore, &p, sizeof(p), eh32.e_phoff + i * sizeof(p)) != sizeof(p))
			return -1;
		phdrs[i].p_type = p.p_type;
		phdrs[i].p_offset = p.p_offset;
		phdrs[i].p_vaddr = p.p_vaddr;
		phdrs[i].p_memsz = p.p_memsz;
	}
	return 0;
}

/* The file offset in /proc/kcore of kernel virtual address addr, or -1. */
static off_t kcore_offset(uint64_t addr, size_t len)
{
	for (int i = 0; i < nphdrs; i++) {
		Elf64_Phdr *p = &phdrs[i];

		if (p->p_type == PT_LOAD && addr >= p->p_vaddr &&
		    addr + len <= p->p_vaddr + p->p_memsz)
			return p->p_offset + (addr - p->p_vaddr);
	}
	return -1;
}

static int section_base(const char *module, const char *section, uint64_t *base)
{
	char path[512];
	FILE *f;
	int ok;

	snprintf(path, sizeof(path), "/sys/module/%s/sections/%s", module, section);
	f = fopen(path, "r");
	if (!f)
		return -1;
	ok = fscanf(f, "%" SCNx64, base) == 1;
	fclose(f);
	return ok && *base ? 0 : -1;
}

static void one(const char *label, const char *module, const char *section,
		uint64_t offset, size_t len)
{
	unsigned char buf[256];
	uint64_t addr = offset;
	off_t at;

	if (strcmp(module, "-")) {
		uint64_t base;

		if (section_base(module, section, &base)) {
			fprintf(out, "PVQ-READ %s fail no-section\n", label);
			return;
		}
		addr = base + offset;
	}
	at = kcore_offset(addr, len);
	if (len > sizeof(buf) || at < 0 || pread(kcore, buf, len, at) != (ssize_t)len) {
		fprintf(out, "PVQ-READ %s fail unreadable-%" PRIx64 "\n", label, addr);
		return;
	}
	fprintf(out, "PVQ-READ %s %" PRIx64 " ", label, addr);
	for (size_t i = 0; i < len; i++)
		fprintf(out, "%02x", buf[i]);
	fputc('\n', out);
}

int main(int argc, char **argv)
{
	char label[128], module[128], section[128];
	unsigned long long offset;
	size_t len;
	FILE *list;

	if (argc != 2) {
		fputs("usage: kread LIST\n", stderr);
		return 2;
	}
	out = fopen("/dev/kmsg", "w");
	if (!out)
		out = stdout;
	setvbuf(out, NULL, _IOLBF, 0); /* one write per line: one kmsg record each */
	list = fopen(argv[1], "r");
	if (!list || load_kcore()) {
		fprintf(out, "PVQ-READ - fail kcore-%d\n", errno);
		return 1;
	}
	while (fscanf(list, "%127s %127s %127s %llx %zu", label, module, section, &offset,
		      &len) == 5)
		one(label, module, section, offset, len);
	fprintf(out, "PVQ-READ-END\n");
	return 0;
}
