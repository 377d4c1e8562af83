/*
 * remote_sort: the BlueBridge C API end to end.
 *
 * 1. The blocking calls: allocate a page, write, read back, compare-and-swap, fetch-and-add,
 *    a transactional update, free, and the error a freed page gives.
 * 2. The pipelined calls: eight pages written and read back with many requests in flight.
 * 3. Remote memory: an array of uint64_t in a region (pages on the server, a resident budget
 *    smaller than the array) filled with random numbers and sorted with the C library's
 *    qsort, which does not know the memory is remote; then the region is closed keeping its
 *    pages, attached again, and checked.
 *
 * Build (cargo xtask capi does): cc -std=c11 remote_sort.c $(pkg-config --cflags --libs bluebridge)
 * Run:   remote_sort --iface IF --next-hop-mac MAC --host 2 [--local ADDR] [--pages N]
 *        [--budget N] [--transport xdp|udp]
 * Exit status 0 when every check passed.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bluebridge.h"

static int failures = 0;

/* Stops on an unexpected status, with the library's explanation. */
#define CHECK(call)                                                                            \
    do {                                                                                       \
        bb_status st_ = (call);                                                                \
        if (st_ != BB_OK) {                                                                    \
            fprintf(stderr, "remote_sort: %s: %s (%s)\n", #call, bb_status_name(st_),          \
                    bb_last_error());                                                          \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

static void expect(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "remote_sort: FAILED: %s\n", what);
        failures++;
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* bb_update's callback: upper-case the bytes, and commit. */
static int32_t shout(void *ctx, uint8_t *bytes, size_t len) {
    int *calls = ctx;
    (*calls)++;
    for (size_t i = 0; i < len; i++) {
        if (bytes[i] >= 'a' && bytes[i] <= 'z') {
            bytes[i] = (uint8_t)(bytes[i] - 'a' + 'A');
        }
    }
    return 0;
}

static uint64_t xorshift(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545f4914f6cdd1dULL;
}

static const char *arg(int argc, char **argv, const char *name, const char *def) {
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], name) == 0) {
            return argv[i + 1];
        }
    }
    return def;
}

static void blocking(bb_client *c, uint16_t host) {
    bb_page p;
    CHECK(bb_alloc(c, host, false, &p));
    char addr[64];
    CHECK(bb_page_format(p, addr, sizeof addr));
    expect(bb_page_host(p) == host, "the page is on the host asked");

    const char hello[] = "hello, remote memory";
    CHECK(bb_write(c, p, 100, hello, sizeof hello));
    char back[sizeof hello];
    CHECK(bb_read(c, p, 100, back, sizeof back));
    expect(memcmp(back, hello, sizeof hello) == 0, "read back what was written");

    uint64_t old = 1;
    CHECK(bb_cas(c, p, 0, 0, 42, &old));
    expect(old == 0, "CAS saw the fresh page's zero");
    CHECK(bb_cas(c, p, 0, 0, 7, &old));
    expect(old == 42, "a second CAS with a stale expectation fails and says why");
    CHECK(bb_fetch_add(c, p, 0, 8, &old));
    expect(old == 42, "FETCH_ADD returns the old value");
    uint64_t word = 0;
    CHECK(bb_read(c, p, 0, &word, sizeof word));
    expect(word == 50, "42 + 8");

    int calls = 0;
    CHECK(bb_update(c, p, 100, 5, shout, &calls));
    CHECK(bb_read(c, p, 100, back, 5));
    expect(calls == 1 && memcmp(back, "HELLO", 5) == 0, "the update committed");

    expect(bb_read(c, p, 4000, back, 200) == BB_INVALID_ARGUMENT, "a range past the page");
    CHECK(bb_free(c, p));
    bb_status st = bb_read(c, p, 0, &word, sizeof word);
    expect(st == BB_STALE_HANDLE, "a freed page answers STALE_HANDLE");
    printf("remote_sort: blocking calls on page %s: write, read, CAS, FETCH_ADD, update, "
           "free (then %s)\n",
           addr, bb_status_name(st));
}

static void pipelined(bb_client *c, uint16_t host) {
    enum { N = 8, ROUNDS = 16 };
    bb_page pages[N];
    for (int i = 0; i < N; i++) {
        CHECK(bb_alloc(c, host, false, &pages[i]));
    }
    uint64_t ticket;
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < N; i++) {
            uint64_t v = (uint64_t)r * 1000 + (uint64_t)i;
            CHECK(bb_submit_write(c, pages[i], (uint16_t)(8 * r), &v, sizeof v, (uint64_t)i,
                                  &ticket));
        }
    }
    size_t done = 0, n = 0;
    bb_completion out[16];
    while (done < N * ROUNDS) {
        CHECK(bb_poll(c, out, 16, 100000, &n));
        expect(n > 0, "completions within 100 ms");
        if (n == 0) {
            return;
        }
        for (size_t k = 0; k < n; k++) {
            expect(out[k].status == BB_OK, "a pipelined write");
        }
        done += n;
    }
    static uint64_t rows[N][ROUNDS];
    for (int i = 0; i < N; i++) {
        CHECK(bb_submit_read(c, pages[i], 0, rows[i], sizeof rows[i], (uint64_t)i, &ticket));
    }
    expect(bb_in_flight(c) == N, "every read in flight at once");
    for (done = 0; done < N;) {
        CHECK(bb_poll(c, out, 16, 100000, &n));
        if (n == 0) {
            expect(0, "read completions within 100 ms");
            return;
        }
        for (size_t k = 0; k < n; k++) {
            expect(out[k].status == BB_OK, "a pipelined read");
            uint64_t i = out[k].tag;
            for (int r = 0; r < ROUNDS; r++) {
                expect(rows[i][r] == (uint64_t)r * 1000 + i, "pipelined read-back");
            }
        }
        done += n;
    }
    for (int i = 0; i < N; i++) {
        CHECK(bb_free(c, pages[i]));
    }
    printf("remote_sort: pipelined: %d writes and %d reads in flight together, all read back\n",
           N * ROUNDS, N);
}

int main(int argc, char **argv) {
    bb_options o;
    bb_options_init(&o);
    o.iface = arg(argc, argv, "--iface", NULL);
    o.next_hop_mac = arg(argc, argv, "--next-hop-mac", NULL);
    o.local = arg(argc, argv, "--local", NULL);
    o.transport = arg(argc, argv, "--transport", NULL);
    uint16_t host = (uint16_t)strtoul(arg(argc, argv, "--host", "2"), NULL, 0);
    size_t pages = strtoul(arg(argc, argv, "--pages", "256"), NULL, 0);
    size_t budget = strtoul(arg(argc, argv, "--budget", "64"), NULL, 0);
    if (o.iface == NULL || pages == 0) {
        fprintf(stderr, "usage: remote_sort --iface IF --next-hop-mac MAC --host H "
                        "[--local ADDR] [--pages N] [--budget N] [--transport xdp|udp]\n");
        return 2;
    }

    bb_client *c = NULL;
    CHECK(bb_open(&o, &c));
    blocking(c, host);
    pipelined(c, host);

    /* Remote memory: the region takes the client (c becomes NULL). */
    bb_region_options ro;
    bb_region_options_init(&ro);
    ro.resident_pages = budget;
    ro.keep_pages = true;
    bb_region *r = NULL;
    CHECK(bb_region_create(&c, &host, 1, pages, &ro, &r));
    expect(c == NULL, "the region owns the client");
    uint64_t *a = bb_region_ptr(r);
    size_t n = bb_region_len(r) / sizeof *a;
    uint64_t seed = 0x9e3779b97f4a7c15ULL, sum = 0;
    for (size_t i = 0; i < n; i++) {
        a[i] = xorshift(&seed);
        sum += a[i];
    }
    qsort(a, n, sizeof *a, cmp_u64);
    uint64_t written = 0;
    CHECK(bb_region_flush(r, &written));
    bb_page *list = calloc(pages, sizeof *list);
    size_t got = 0;
    CHECK(bb_region_close(r, list, pages, &got, &c));
    expect(got == pages && c != NULL, "the pages and the client come back at close");

    /* The same pages, attached again: still sorted, nothing lost. */
    ro.keep_pages = false;
    CHECK(bb_region_attach(&c, list, got, &ro, &r));
    a = bb_region_ptr(r);
    uint64_t sum2 = a[0];
    int sorted = 1;
    for (size_t i = 1; i < n; i++) {
        sorted &= a[i - 1] <= a[i];
        sum2 += a[i];
    }
    expect(sorted, "the array is sorted");
    expect(sum == sum2, "the same numbers (their sum) after the sort");
    CHECK(bb_region_close(r, NULL, 0, NULL, NULL));
    free(list);
    printf("remote_sort: %zu uint64_t (%zu pages, %zu resident) sorted in remote memory with "
           "qsort, %" PRIu64 " dirty pages flushed, reattached: %s\n",
           n, pages, budget, written, sorted && sum == sum2 ? "sorted" : "NOT SORTED");
    if (failures) {
        fprintf(stderr, "remote_sort: %d check(s) failed\n", failures);
        return 1;
    }
    printf("remote_sort: all checks passed\n");
    return 0;
}
