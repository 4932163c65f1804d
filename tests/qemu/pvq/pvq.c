// SPDX-License-Identifier: GPL-2.0
/*
 * pvq: a test module for pvpatch's QEMU harness (tests/qemu/harness.py, issue 16).
 *
 * pvq_site() holds one real paravirt call site: arch_local_save_flags() is
 * PVOP_ALT_CALLEE0(irq.save_fl) in 6.1 (a .parainstructions entry, CLBR_RET_REG, callee
 * saves every other register).  pvpatch sends that site to pvq_save_fl(), a plain C
 * function, through an injected thunk (convention "c").  pvq_save_fl() prints the
 * kernel stack with dump_stack(): the running kernel's ORC unwinder has to walk from it
 * through the thunk (whose ORC entries pvpatch planted) to pvq_site(), pvq_init() and
 * do_one_initcall().  Each dump is bracketed by "PVQ-DUMP <tag> begin/end" lines.
 *
 * Its work is done in init: it then refuses to stay loaded (-EAGAIN, as tcrypt does), so
 * several copies (patched differently) load one after the other in one boot.  (busybox
 * insmod tries init_module after a failed finit_module: each load runs init twice.)
 */
#include <linux/init.h>
#include <linux/irqflags.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/printk.h>

static char *tag = "pvq";
module_param(tag, charp, 0444);
MODULE_PARM_DESC(tag, "the name this load's dump lines carry");

static int calls;

/* The thunk's callee: a plain C function (pvpatch's spec target). */
noinline unsigned long pvq_save_fl(void)
{
	calls++;
	pr_info("PVQ-DUMP %s begin\n", tag);
	dump_stack();
	pr_info("PVQ-DUMP %s end\n", tag);
	return native_save_fl();
}

/* The paravirt site: irq.save_fl (pushf; pop %rax natively). */
noinline unsigned long pvq_site(void)
{
	unsigned long flags = arch_local_save_flags();

	barrier();
	return flags;
}

static int __init pvq_init(void)
{
	unsigned long flags = pvq_site();

	/*
	 * The init function's address too: do_one_initcall() called it through a register
	 * that the thunk saves, so the dump's stack scan meets that value ("? 0x...").
	 */
	pr_info("PVQ-SAVEFL %s flags=%lx calls=%d init=%px\n", tag, flags, calls, pvq_init);
	return -EAGAIN;
}
module_init(pvq_init);

MODULE_DESCRIPTION("pvpatch test module: a paravirt site whose callee dumps the stack");
MODULE_LICENSE("GPL");
