/* Exercises libedgetts for the sanitizer test: 200+ calls with bad inputs among them, a cancel
 * from another thread, and two runtimes answering in two threads at once.
 *
 *   c_runtime_stress CONFIG CORRUPT_DIR TRUNCATED_DIR QUESTIONS_FILE
 *
 * Prints one line per failed expectation and "calls N failures F"; exits 1 when F > 0.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "edgetts.h"

static int calls, failures;
static char questions[64][256];
static int n_questions;

static void expect(int ok, const char *what, const char *detail)
{
    calls++;
    if (!ok) {
        failures++;
        printf("FAIL %s: %s\n", what, detail ? detail : "");
    }
}

static void expect_open_fails(const char *config, const char *model_dir, edgetts_status want, const char *what)
{
    edgetts_options o;
    edgetts_runtime *rt = (edgetts_runtime *)1;
    char err[512] = "";
    edgetts_options_init(&o);
    o.config_path = config;
    o.model_dir = model_dir;
    edgetts_status st = edgetts_open(&o, &rt, err, sizeof err);
    expect(st == want && rt == NULL && err[0] != '\0', what, err);
}

typedef struct job {
    edgetts_runtime *rt;
    int point;
    char answers[8][EDGETTS_ANSWER_MAX];
    int tokens[8];
    edgetts_status status;
} job;

static void *answer_eight(void *arg)
{
    job *j = arg;
    j->status = EDGETTS_OK;
    for (int i = 0; i < 8; i++) {
        edgetts_result r;
        edgetts_status st = edgetts_run_point(j->rt, j->point, questions[i % n_questions], 0, 0,
                                              EDGETTS_NO_DEADLINE, 7, &r);
        if (st != EDGETTS_OK) {
            j->status = st;
        } else {
            snprintf(j->answers[i], EDGETTS_ANSWER_MAX, "%s", r.has_answer ? r.answer : "(none)");
            j->tokens[i] = r.generated_tokens;
        }
        edgetts_result_free(&r);
    }
    return NULL;
}

static edgetts_runtime *open_rt(const char *config)
{
    edgetts_options o;
    edgetts_runtime *rt = NULL;
    char err[512];
    edgetts_options_init(&o);
    o.config_path = config;
    o.threads = 1;
    if (edgetts_open(&o, &rt, err, sizeof err) != EDGETTS_OK) {
        printf("FAIL open: %s\n", err);
        exit(1);
    }
    return rt;
}

static volatile int call_done;

static void *cancel_soon(void *arg)
{
    struct timespec ts = {0, 1000000};
    while (!call_done) { /* every millisecond until the call returns: one of them finds it running */
        nanosleep(&ts, NULL);
        edgetts_cancel(arg);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s CONFIG CORRUPT_DIR TRUNCATED_DIR QUESTIONS_FILE\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[4], "r");
    if (f == NULL) {
        return 2;
    }
    while (n_questions < 64 && fgets(questions[n_questions], sizeof questions[0], f) != NULL) {
        questions[n_questions][strcspn(questions[n_questions], "\n")] = '\0';
        n_questions++;
    }
    fclose(f);

    expect_open_fails(argv[1], "/nonexistent/models", EDGETTS_E_MODEL, "missing model");
    expect_open_fails(argv[1], argv[2], EDGETTS_E_MODEL, "corrupt GGUF");
    expect_open_fails(argv[1], argv[3], EDGETTS_E_MODEL, "truncated GGUF");
    expect_open_fails(argv[4], NULL, EDGETTS_E_CONFIG, "wrong config");
    expect_open_fails("/nonexistent/config.json", NULL, EDGETTS_E_CONFIG, "missing config");
    expect(edgetts_open(NULL, NULL, NULL, 0) == EDGETTS_E_ARGUMENT, "NULL out", NULL);

    edgetts_runtime *rt = open_rt(argv[1]);
    /* a mean budget no answer meets: each answer below raises the price (to its ceiling) */
    expect(edgetts_set_mean_budget(NULL, 5, EDGETTS_COST_MS) == EDGETTS_E_ARGUMENT, "budget on NULL", NULL);
    expect(edgetts_set_mean_budget(rt, NAN, EDGETTS_COST_MS) == EDGETTS_E_ARGUMENT, "NaN budget", NULL);
    expect(edgetts_set_mean_budget(rt, 5, (edgetts_cost)9) == EDGETTS_E_ARGUMENT, "bad cost kind", NULL);
    expect(edgetts_set_mean_budget(rt, 5, EDGETTS_COST_J) == EDGETTS_E_ARGUMENT
               && strstr(edgetts_last_error(rt), "energy_j") != NULL, "joules without energy figures",
           edgetts_last_error(rt));
    expect(edgetts_spent(NULL, 1) == 0.0, "spent on NULL", NULL);
    expect(edgetts_set_mean_budget(rt, 0.001, EDGETTS_COST_MS) == EDGETTS_OK, "mean budget", edgetts_last_error(rt));
    char *long_q = malloc(20001);
    memset(long_q, '7', 20000);
    long_q[20000] = '\0';
    int last = edgetts_n_points() - 1;
    for (int i = 0; calls < 190; i++) {
        edgetts_result r;
        edgetts_status st;
        const char *q = questions[i % n_questions];
        switch (i % 10) {
        case 0:
            st = edgetts_answer(rt, q, -5, 0, (unsigned)i, &r);
            expect(st == EDGETTS_E_ARGUMENT, "negative deadline", edgetts_last_error(rt));
            break;
        case 1:
            st = edgetts_answer(rt, q, 0, 0, (unsigned)i, &r);
            expect(st == EDGETTS_E_ARGUMENT, "zero deadline", edgetts_last_error(rt));
            break;
        case 2:
            st = edgetts_answer(rt, long_q, EDGETTS_NO_DEADLINE, 0, (unsigned)i, &r);
            expect(st == EDGETTS_E_TOO_LONG, "question too long", edgetts_last_error(rt));
            break;
        case 3:
            st = edgetts_run_point(rt, 0, q, 999, 0, EDGETTS_NO_DEADLINE, (unsigned)i, &r);
            expect(st == EDGETTS_E_ARGUMENT, "n above the maximum", edgetts_last_error(rt));
            break;
        case 4:
            st = edgetts_answer(rt, NULL, 100, 0, (unsigned)i, &r);
            expect(st == EDGETTS_E_ARGUMENT, "NULL question", edgetts_last_error(rt));
            break;
        case 5:
            st = edgetts_run_point(rt, 99, q, 0, 0, 100, (unsigned)i, &r);
            expect(st == EDGETTS_E_ARGUMENT, "bad point", edgetts_last_error(rt));
            break;
        case 6: /* the fastest point's own latency runs (tightly); half of it is the caller's error */
            if ((i / 10) % 2) {
                st = edgetts_answer(rt, q, edgetts_point_at(0)->latency_ms / 2, 0, (unsigned)i, &r);
                expect(st == EDGETTS_E_DEADLINE && r.rows_used == 0 && strstr(edgetts_last_error(rt), "fastest"),
                       "deadline shorter than the fastest point", edgetts_last_error(rt));
            } else {
                st = edgetts_answer(rt, q, edgetts_point_at(0)->latency_ms, 0, (unsigned)i, &r);
                expect(st == EDGETTS_OK && r.deadline_met != -1, "tight deadline", edgetts_last_error(rt));
            }
            break;
        case 7:
            st = edgetts_answer(rt, q, NAN, 0, (unsigned)i, &r);
            expect(st == EDGETTS_E_ARGUMENT, "NaN deadline", edgetts_last_error(rt));
            break;
        case 8:
            st = edgetts_run_point(rt, i % (last + 1), q, 0, 0, EDGETTS_NO_DEADLINE, (unsigned)i, &r);
            expect(st == EDGETTS_OK && r.rows_used >= 1 && r.generated_tokens > 0, "run point",
                   edgetts_last_error(rt));
            break;
        default:
            st = edgetts_answer(rt, q, 1000 + i, i % 3 ? 0.5 : 0, (unsigned)i, &r);
            expect(st == EDGETTS_OK && r.point_id != NULL, "answer", edgetts_last_error(rt));
            break;
        }
        edgetts_result_free(&r);
    }
    free(long_q);
    expect(edgetts_price(rt) > 0, "answers over the mean budget raise the price", NULL);

    /* a cancel from another thread stops the running call: fewer tokens than its rows and budget */
    int stopped = 0;
    for (int k = 0; k < 5 && !stopped; k++) {
        pthread_t t;
        edgetts_result r;
        const edgetts_point_info *p = edgetts_point_at(last);
        call_done = 0;
        pthread_create(&t, NULL, cancel_soon, rt);
        edgetts_status st = edgetts_run_point(rt, last, questions[k], 0, 0, EDGETTS_NO_DEADLINE, 1, &r);
        call_done = 1;
        pthread_join(t, NULL);
        expect(st == EDGETTS_OK || st == EDGETTS_E_CANCELLED, "cancel", edgetts_last_error(rt));
        stopped = st == EDGETTS_E_CANCELLED && r.generated_tokens < p->n * p->budget;
        edgetts_result_free(&r);
    }
    expect(stopped, "a cancel stops a running call short of its budget", NULL);

    /* a cancel that comes while no call runs (a watchdog firing after the answer) touches no later call */
    for (int k = 0; k < 3; k++) {
        edgetts_result r;
        edgetts_cancel(rt);
        edgetts_status st = edgetts_run_point(rt, last, questions[k], 0, 0, EDGETTS_NO_DEADLINE, 1, &r);
        expect(st == EDGETTS_OK && r.rows_used >= 1, "a late cancel leaves the next call alone", edgetts_last_error(rt));
        edgetts_result_free(&r);
    }

    /* a call that fails its checks, after a cancel: the next call runs */
    for (int k = 0; k < 3; k++) {
        edgetts_result r;
        edgetts_cancel(rt);
        edgetts_status st = k == 0   ? edgetts_answer(rt, questions[0], -1, 0, 1, &r)
                            : k == 1 ? edgetts_run_point(rt, 99, questions[0], 0, 0, 100, 1, &r)
                                     : edgetts_run_point(rt, 0, " \n", 0, 0, 100, 1, &r);
        expect(st == EDGETTS_E_ARGUMENT, "failed call after a cancel", edgetts_last_error(rt));
        edgetts_result_free(&r);
        st = edgetts_run_point(rt, 0, questions[k], 0, 0, EDGETTS_NO_DEADLINE, 1, &r);
        expect(st == EDGETTS_OK && r.rows_used >= 1, "cancel cleared by a failed call", edgetts_last_error(rt));
        edgetts_result_free(&r);
    }

    /* two runtimes in two threads give what one runtime gives alone */
    job alone = {rt, last, {{0}}, {0}, EDGETTS_OK};
    answer_eight(&alone);
    job a = {rt, last, {{0}}, {0}, EDGETTS_OK}, b = {open_rt(argv[1]), last, {{0}}, {0}, EDGETTS_OK};
    pthread_t ta, tb;
    pthread_create(&ta, NULL, answer_eight, &a);
    pthread_create(&tb, NULL, answer_eight, &b);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    for (int i = 0; i < 8; i++) {
        int same = strcmp(a.answers[i], alone.answers[i]) == 0 && strcmp(b.answers[i], alone.answers[i]) == 0
                   && a.tokens[i] == alone.tokens[i] && b.tokens[i] == alone.tokens[i];
        expect(a.status == EDGETTS_OK && b.status == EDGETTS_OK && same, "two runtimes in two threads",
               alone.answers[i]);
    }
    calls += 24; /* the three jobs' run_point calls */
    edgetts_close(b.rt);
    edgetts_close(rt);
    printf("calls %d failures %d\n", calls, failures);
    return failures > 0;
}
