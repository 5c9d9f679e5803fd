/*
 * An AVX2-only CPU on a newer x86 one: an LD_PRELOAD library that hides every instruction
 * set past AVX2 from the CPUID instruction, so the programs of one run (perqc's kernels,
 * ONNX Runtime's MLAS, Rust's feature detection) dispatch as they would on a Haswell-to-Zen 3
 * class CPU. Used by scripts/bench/avx2-only; see docs/runtime.md.
 *
 * How: ARCH_SET_CPUID(0) makes CPUID fault in this thread and every thread it starts (the
 * kernel's CPUID faulting, `cpuid_fault` in /proc/cpuinfo). The SIGSEGV handler checks that
 * the faulting instruction is CPUID (0F A2), runs the real one with faulting briefly off,
 * clears the feature bits below and steps over it. A program's own SIGSEGV handler (rustc
 * installs one) is kept aside, not installed: `sigaction` and `signal` are interposed for
 * SIGSEGV, and any fault that is not CPUID goes to that handler, or to the default action.
 *
 * Hidden (CPUID leaf 7): AVX-512 (every subset), AMX, AVX-VNNI, AVX-IFMA and the AVX
 * VNNI-INT8/INT16 and NE-CONVERT extensions. Kept: AVX, AVX2, FMA, F16C, BMI1/2.
 * The dynamic loader reads CPUID before this library loads, so glibc's own string functions
 * may still pick AVX-512 variants (set GLIBC_TUNABLES as the wrapper does to stop that).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static void cpuid_faulting(int on) { syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL */
        r[1] &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
        /* ECX: AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
        r[2] &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
        /* EDX: AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512_FP16, AMX-TILE, AMX-INT8 */
        r[3] &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX-VNNI, AVX512_BF16, AVX-IFMA */
        r[0] &= ~(BIT(4) | BIT(5) | BIT(23));
        /* EDX: AVX-VNNI-INT8, AVX-NE-CONVERT, AVX-VNNI-INT16 */
        r[3] &= ~(BIT(4) | BIT(5) | BIT(10));
    }
}

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static sigaction_fn real_sigaction(void) {
    static sigaction_fn f;
    if (!f)
        f = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return f;
}

/* The program's SIGSEGV action, which it believes installed. */
static struct sigaction program_action = {.sa_handler = SIG_DFL};

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig != SIGSEGV)
        return real_sigaction()(sig, act, old);
    if (old)
        *old = program_action;
    if (act)
        program_action = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    sigemptyset(&act.sa_mask);
    act.sa_flags = SA_RESTART;
    return sigaction(sig, &act, &old) == 0 ? old.sa_handler : SIG_ERR;
}

static void on_segv(int sig, siginfo_t *info, void *ctx) {
    greg_t *g = ((ucontext_t *)ctx)->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)g[REG_RIP];
    if (ip == NULL || ip[0] != 0x0f || ip[1] != 0xa2) {
        /* Not a CPUID: the program's handler, else the default action (the fault recurs). */
        struct sigaction p = program_action;
        if ((p.sa_flags & SA_SIGINFO) && p.sa_sigaction) {
            p.sa_sigaction(sig, info, ctx);
        } else if (p.sa_handler != SIG_DFL && p.sa_handler != SIG_IGN) {
            p.sa_handler(sig);
        } else {
            struct sigaction dfl;
            memset(&dfl, 0, sizeof dfl);
            dfl.sa_handler = SIG_DFL;
            real_sigaction()(sig, &dfl, NULL);
        }
        return;
    }
    uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], r[4];
    cpuid_faulting(0);
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
    cpuid_faulting(1);
    mask(leaf, sub, r);
    g[REG_RAX] = r[0];
    g[REG_RBX] = r[1];
    g[REG_RCX] = r[2];
    g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
}

__attribute__((constructor)) static void start(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK; /* a thread's alternate stack, where it has one */
    sigemptyset(&sa.sa_mask);
    if (real_sigaction()(SIGSEGV, &sa, NULL) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        fprintf(stderr, "avx2_only: this CPU or kernel cannot make CPUID fault (no cpuid_fault)\n");
        exit(2);
    }
}
