/* A UDP echo server for pier's tests: answers each datagram with
 * "<hostname>:<datagram>" from the port it came to. Built static by
 * tests/images/build.sh into the test image as /bin/udp-echo.
 *
 *   udp-echo [PORT]              serve (default 5353)
 *   udp-echo --ask IP PORT MSG   send MSG (up to 5 times, 1 s apart) and
 *                                print the first answer; exit 1 without */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int ask(const char *ip, int port, const char *msg) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) { fprintf(stderr, "bad IP %s\n", ip); return 2; }
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); return 2; }
    struct timeval tv = {1, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    static char buf[65536];
    for (int i = 0; i < 5; i++) {
        send(s, msg, strlen(msg), 0);
        ssize_t n = recv(s, buf, sizeof buf - 1, 0);
        if (n >= 0) { buf[n] = 0; printf("%s\n", buf); return 0; }
    }
    fprintf(stderr, "no answer from %s:%d\n", ip, port);
    return 1;
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "--ask") == 0) return ask(argv[2], atoi(argv[3]), argv[4]);
    int port = argc > 1 ? atoi(argv[1]) : 5353;
    char host[256] = "?";
    gethostname(host, sizeof host - 1);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    fprintf(stderr, "udp-echo on :%d as %s\n", port, host);
    static char in[65536], out[65536 + 300];
    for (;;) {
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(s, in, sizeof in, 0, (struct sockaddr *)&from, &fl);
        if (n < 0) continue;
        int h = snprintf(out, 300, "%s:", host);
        memcpy(out + h, in, (size_t)n);
        sendto(s, out, (size_t)h + (size_t)n, 0, (struct sockaddr *)&from, fl);
    }
}
