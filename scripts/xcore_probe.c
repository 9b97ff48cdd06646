/* Round trip of one cache line between two CPUs (ns): two threads pinned to the CPUs given
 * (default: the first two this process may run on) hand a counter back and forth.
 *     xcore_probe [CPU_A CPU_B] [ROUND_TRIPS]
 * A virtual machine's two vCPUs on one core complex hand a line over in ~60 ns; placed on
 * different chiplets or sockets, in ~300 ns or more, and every cache line one core writes and the
 * other reads costs that much more: kernels that pass data between cores slow down. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Atomic long flag __attribute__((aligned(64)));
static long trips = 20000;
static int cpus[2] = {-1, -1};

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *other(void *unused) {
    (void)unused;
    if (pin(cpus[1]) != 0) exit(3);
    for (long i = 0; i < trips; i++) {
        while (atomic_load(&flag) != 2 * i + 1) {}
        atomic_store(&flag, 2 * i + 2);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc >= 3) {
        cpus[0] = atoi(argv[1]);
        cpus[1] = atoi(argv[2]);
    } else {
        cpu_set_t allowed;
        if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) return 2;
        for (int c = 0, k = 0; c < CPU_SETSIZE && k < 2; c++)
            if (CPU_ISSET(c, &allowed)) cpus[k++] = c;
    }
    if (argc >= 4) trips = atol(argv[3]);
    if (cpus[0] < 0 || cpus[1] < 0 || trips < 1) {
        fprintf(stderr, "needs two CPUs\n");
        return 2;
    }
    pthread_t thread;
    if (pin(cpus[0]) != 0 || pthread_create(&thread, NULL, other, NULL) != 0) return 3;
    double start = now();
    for (long i = 0; i < trips; i++) {
        while (atomic_load(&flag) != 2 * i) {}
        atomic_store(&flag, 2 * i + 1);
    }
    pthread_join(thread, NULL);
    printf("%.1f\n", (now() - start) / trips * 1e9);
    return 0;
}
