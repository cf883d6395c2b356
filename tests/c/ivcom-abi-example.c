/*
 * The C ABI from C, as a user of the libivcom-dev package builds it:
 *
 *   cc ivcom-abi-example.c $(pkg-config --cflags --libs ivcom) -o ivcom-abi-example
 *
 * Two nodes of this process share a hypervisor directory; node a opens a
 * link to node b's card (the ring), sends messages of several sizes, b
 * takes the link from its acceptor and polls; every byte is checked.
 * Prints "ABI PASS messages=N path=ring" and exits 0, or says what failed
 * and exits 1. scripts/package test runs it against the installed package.
 */
#include <ivcom.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NMSG 64

static unsigned char *want[NMSG];
static size_t want_len[NMSG];
static int got;

static void die(const char *what)
{
    char err[512];
    ivcom_last_error(err, sizeof(err));
    fprintf(stderr, "ABI FAIL: %s: %s\n", what, err);
    exit(1);
}

static void on_message(void *ctx, uint8_t tag, const uint8_t *data, size_t len)
{
    (void) ctx;
    if (got >= NMSG || tag != (uint8_t) (got % 250) || len != want_len[got]
        || (len && memcmp(data, want[got], len))) {
        fprintf(stderr, "ABI FAIL: message %d: tag %u, %zu bytes\n", got, tag, len);
        exit(1);
    }
    got++;
}

static ivcom_node *node(const char *dir)
{
    ivcom_config cfg;
    ivcom_node *n;
    ivcom_config_default(&cfg);
    cfg.backend = IVCOM_BACKEND_HOST;
    cfg.host_dir = dir;
    cfg.poll_only = 1;
    if (IVCOM_OK != ivcom_node_new(&cfg, &n)) {
        die("ivcom_node_new");
    }
    return n;
}

int main(void)
{
    char dir[] = "/tmp/ivcom-abi-XXXXXX";
    ivcom_node *a, *b;
    ivcom_link *la = NULL, *lb = NULL;
    uint8_t card[256];
    size_t card_len;
    time_t until = time(NULL) + 20;

    if (NULL == mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    a = node(dir);
    b = node(dir);
    /* Each node accepts only peers whose full card (it holds their secret
     * key) it was given: b admits a before a connects. */
    card_len = ivcom_node_card(a, card, sizeof(card));
    if (card_len == 0 || card_len > sizeof(card) || IVCOM_OK != ivcom_node_admit(b, card, card_len)) {
        die("ivcom_node_admit");
    }
    card_len = ivcom_node_card(b, card, sizeof(card));
    if (card_len == 0 || card_len > sizeof(card)) {
        die("ivcom_node_card");
    }
    if (IVCOM_OK != ivcom_link_open(a, card, card_len, &la)) {
        die("ivcom_link_open");
    }
    while (1 != ivcom_node_accept(b, &lb)) {
        if (time(NULL) > until) {
            die("b never got the link");
        }
        usleep(1000);
    }
    if (IVCOM_PATH_RING != ivcom_link_path(la) || IVCOM_PATH_RING != ivcom_link_path(lb)) {
        die("the link is not on the ring");
    }
    for (int k = 0; k < NMSG; k++) {
        size_t len = (size_t) k * k * 61 % 70001;
        ivcom_iov iov;
        want[k] = malloc(len + 1);
        want_len[k] = len;
        for (size_t i = 0; i < len; i++) {
            want[k][i] = (unsigned char) (i * 31 + k * 7);
        }
        iov.base = want[k];
        iov.len = len;
        int rc;
        while (0 == (rc = ivcom_link_try_send(la, (uint8_t) (k % 250), &iov, 1))) {
            if (ivcom_link_poll(lb, 16, on_message, NULL) < 0) {
                die("poll");
            }
        }
        if (rc < 0) {
            die("ivcom_link_try_send");
        }
    }
    while (got < NMSG) {
        if (ivcom_link_poll(lb, 16, on_message, NULL) < 0 || time(NULL) > until) {
            die("receiving");
        }
    }
    ivcom_link_free(la);
    ivcom_link_free(lb);
    ivcom_node_free(a);
    ivcom_node_free(b);
    rmdir(dir);
    printf("ABI PASS messages=%d path=ring\n", got);
    return 0;
}
