// SPDX-License-Identifier: GPL-2.0-only
/*
 * /init for the i386 guests (Debian's busybox-static is 64-bit): mounts proc and devtmpfs,
 * loads the modules listed in /m/list ("label path" per line) with finit_module, and writes
 * the harness's markers on /dev/kmsg (PVQ-USERSPACE, PVQ-LOAD label ok|fail, PVQ-TAINTED,
 * PVQ-END), runs /bin/kread /m/reads when there is one (the read-back), then powers off.
 * Built by tests/qemu/harness.py with gcc -m32 -static.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static int kmsg = -1;

static void mark(const char *text)
{
	char line[512];
	int n = snprintf(line, sizeof(line), "PVQ-%s\n", text);

	if (write(kmsg, line, n) < 0)
		return;
}

int main(void)
{
	char label[256], path[256], text[512], taint[32] = "?";
	FILE *list;
	int fd;

	mount("proc", "/proc", "proc", 0, 0);
	mount("devtmpfs", "/dev", "devtmpfs", 0, 0);
	mount("sysfs", "/sys", "sysfs", 0, 0);
	kmsg = open("/dev/kmsg", O_WRONLY);
	mark("USERSPACE");
	list = fopen("/m/list", "r");
	while (list && fscanf(list, "%255s %255s", label, path) == 2) {
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd >= 0 && syscall(SYS_finit_module, fd, "", 0) == 0)
			snprintf(text, sizeof(text), "LOAD %s ok", label);
		else
			snprintf(text, sizeof(text), "LOAD %s fail %d %s", label, errno,
				 strerror(errno));
		if (fd >= 0)
			close(fd);
		mark(text);
	}
	/* The read-back helper, when the harness put one in (tests/qemu/kread.c). */
	if (access("/bin/kread", X_OK) == 0) {
		pid_t pid = fork();

		if (pid == 0) {
			execl("/bin/kread", "kread", "/m/reads", (char *)NULL);
			_exit(127);
		}
		if (pid > 0)
			waitpid(pid, NULL, 0);
	}
	fd = open("/proc/sys/kernel/tainted", O_RDONLY);
	if (fd >= 0) {
		ssize_t n = read(fd, taint, sizeof(taint) - 1);

		taint[n > 0 ? n : 0] = 0;
		taint[strcspn(taint, "\n")] = 0;
	}
	snprintf(text, sizeof(text), "TAINTED %s", taint);
	mark(text);
	mark("END");
	reboot(RB_POWER_OFF);
	return 0;
}
