/* A closed-loop UDP load generator for scripts/bench-udp.sh: FLOWS
 * sockets (each its own source port, so its own 5-tuple flow through a
 * proxy), each keeping WINDOW datagrams of SIZE bytes in flight to IP:PORT
 * (an echo server, or a proxy in front of one), for SECONDS. A socket that
 * has had no answer for 200 ms has its window refilled (the lost datagrams
 * are counted). Loopback only, unless the last argument is `container`
 * (the caller passes it only with the address of a container it started).
 *
 *   udp-load IP PORT FLOWS WINDOW SECONDS SIZE [container]
 *
 * Prints one line: "replies=N sent=N refilled=N secs=S setup=S pps=P", where pps is
 * echoed datagrams (round trips) per second over the last SECONDS minus a
 * 0.5 s warm-up. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    int container = argc == 8 && strcmp(argv[7], "container") == 0;
    if (argc != 7 && !container) {
        fprintf(stderr, "usage: udp-load IP PORT FLOWS WINDOW SECONDS SIZE [container]\n");
        return 2;
    }
    const char *ip = argv[1];
    int port = atoi(argv[2]), flows = atoi(argv[3]), window = atoi(argv[4]);
    double secs = atof(argv[5]);
    int size = atoi(argv[6]);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1 ||
        (!container && (ntohl(a.sin_addr.s_addr) >> 24) != 127)) {
        fprintf(stderr, "udp-load: %s is not a loopback address; refusing\n", ip);
        return 2;
    }
    if (flows < 1 || flows > 1024 || window < 1 || window > 256 || secs <= 0 || secs > 120 ||
        size < 1 || size > 1400) {
        fprintf(stderr, "udp-load: FLOWS 1..1024, WINDOW 1..256, SECONDS 0..120, SIZE 1..1400\n");
        return 2;
    }
    int ep = epoll_create1(0);
    int *fd = calloc(flows, sizeof *fd);
    double *last = calloc(flows, sizeof *last);
    static char buf[65536], msg[1400];
    memset(msg, 'x', sizeof msg);
    long long sent = 0, replies = 0, refilled = 0, counted = 0;
    double start = now();
    for (int i = 0; i < flows; i++) {
        fd[i] = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fd[i] < 0 || connect(fd[i], (struct sockaddr *)&a, sizeof a) < 0) {
            perror("udp-load: socket");
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd[i], &ev);
        for (int w = 0; w < window; w++)
            if (send(fd[i], msg, size, 0) == size) sent++;
    }
    /* The clock starts once every flow is sending (the first datagram to a
     * new address may wait on neighbour resolution). */
    double t0 = now();
    for (int i = 0; i < flows; i++) last[i] = t0;
    double warm = t0 + 0.5, end = t0 + 0.5 + secs, tick = t0;
    struct epoll_event evs[256];
    for (;;) {
        double t = now();
        if (t >= end) break;
        int n = epoll_wait(ep, evs, 256, 20);
        t = now();
        for (int k = 0; k < n; k++) {
            int i = (int)evs[k].data.u32;
            for (;;) {
                ssize_t r = recv(fd[i], buf, sizeof buf, 0);
                if (r < 0) break; /* EAGAIN, or ECONNREFUSED: counted as no reply */
                replies++;
                if (t >= warm && t < end) counted++;
                last[i] = t;
                if (send(fd[i], msg, size, 0) == size) sent++;
            }
        }
        if (t - tick >= 0.05) {
            tick = t;
            for (int i = 0; i < flows; i++) {
                if (t - last[i] >= 0.2) {
                    for (int w = 0; w < window; w++)
                        if (send(fd[i], msg, size, 0) == size) sent++;
                    refilled += window;
                    last[i] = t;
                }
            }
        }
    }
    printf("replies=%lld sent=%lld refilled=%lld secs=%.3f setup=%.3f pps=%.0f\n", replies, sent,
           refilled, secs, t0 - start, counted / secs);
    return 0;
}
