// SPDX-License-Identifier: GPL-2.0-only
/*
 * finit MODULE.ko.xz: load a compressed module the way kmod 31+ does, handing the file to
 * the kernel with MODULE_INIT_COMPRESSED_FILE so its own decompressor reads it.  Built by
 * tests/qemu/harness.py with gcc -static.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MODULE_INIT_COMPRESSED_FILE 4	/* include/uapi/linux/module.h, 6.2+ */

int main(int argc, char **argv)
{
	int fd;

	if (argc != 2) {
		fputs("usage: finit MODULE.ko.xz\n", stderr);
		return 2;
	}
	fd = open(argv[1], O_RDONLY | O_CLOEXEC);
	if (fd < 0 || syscall(SYS_finit_module, fd, "", MODULE_INIT_COMPRESSED_FILE)) {
		int e = errno;

		fprintf(stderr, "%s: %s\n", argv[1], strerror(e));
		return e;
	}
	return 0;
}
