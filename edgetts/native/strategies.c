/* The budget controller and the strategies a frontier can choose without a verifier.
 *
 * Mirrors edgetts/strategies (base.py, single.py, voting.py, aggregate.py):
 *
 * - the budget controller, after every step: a row that sampled `budget` thinking tokens
 *   gets the family's end of thinking and answer prefix forced with ETT_ANSWER_TOKENS of
 *   room; a row whose own end-of-thinking tokens appear starts its answer there; a row stops
 *   ETT_ANSWER_TOKENS after its reasoning ended.  Under a deadline it keeps running estimates
 *   of one decode step and of one prompt token, forces every thinking row to answer while
 *   that still fits, and stops all rows when not even one more step fits;
 * - single (one row), majority (n rows, one batch, majority vote), first-finish (the first
 *   row to end on its own wins: fewest sampled tokens, then lowest index), esc (windows of
 *   max(2, n/4) rows until a window is unanimous), adaptive (4 rows, then 2 more, until the
 *   Beta posterior that the leader beats the runner-up exceeds 0.95) and weighted (n rows, each
 *   voting with exp of its lowest mean log-probability over 16 tokens, DeepConf's defaults).
 *   Rows are seeded seed + i by overall index, so esc's and adaptive's first rows are majority's.
 *
 * A row stopped while still reasoning (deadline, cancel) has no answer and casts no vote.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

/* EDGETTS_STEP_CLOCK_MS (tests only): a clock that advances that many milliseconds per llama_decode
 * and stands still otherwise, so the deadline branch runs the same on the C and Python runtimes
 * whatever the machine's speed (the parity test drives both with it). */
static double step_clock_s = -1.0;
static volatile long decodes;

void ett_decoded(void)
{
    decodes++;
}

double ett_now(void)
{
    if (step_clock_s < 0) {
        const char *env = getenv("EDGETTS_STEP_CLOCK_MS");
        step_clock_s = env != NULL && *env != '\0' ? atof(env) / 1000.0 : 0.0;
    }
    if (step_clock_s > 0) {
        return (double)decodes * step_clock_s;
    }
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct budget_ctl {
    const ett_point *pt;
    int budget;
    double started, deadline_s; /* deadline_s < 0: none */
    int end_ids[16], n_end;     /* the end-of-thinking tokens */
    char forced[512];           /* the forced text: end of thinking and answer prefix */
    int forced_len, prompt_tokens;
    double token_s, last_step, step_s;
    double stall_s; /* the longest wait seen beyond a step's running estimate: the answer keeps room for one */
    int has_last;
    int *answer_start, *think_count, *forced_answer; /* per row; answer_start -1: still thinking */
    int first_finish, winner;
    volatile int *cancel; /* the id of the call a cancel is for (ett_run.call: this call's) */
    int call;
} budget_ctl;

static void stop_all(ett_ctl *ctl, const char *reason)
{
    for (int i = 0; i < ctl->n; i++) {
        ett_stop(ctl, i, reason);
    }
}

static void force_answer(budget_ctl *b, ett_ctl *ctl, int i)
{
    ett_force(ctl, i, b->forced, ETT_ANSWER_TOKENS);
    b->forced_answer[i] = 1;
    b->answer_start[i] = ctl->rows[i].n_tokens + b->n_end;
    b->think_count[i] = ctl->rows[i].n_generated;
}

/* Whether `rows` rows must be given the answer prefix now for the answer to be stated before the
 * deadline (BudgetController._answer_due): the forced text's decode, `steps` answer steps with their
 * safety and one stall like the longest seen no longer fit in what is left. */
static int answer_due(const budget_ctl *b, double now, int rows, int steps)
{
    if (b->deadline_s < 0) {
        return 0;
    }
    double forced_decode = rows * b->forced_len * b->token_s;
    return b->deadline_s - now < forced_decode + (steps + 1) * b->step_s * ETT_ANSWER_SAFETY + b->stall_s;
}

static int cancelled(const budget_ctl *b)
{
#if defined(__GNUC__) || defined(__clang__)
    return b->cancel != NULL && __atomic_load_n(b->cancel, __ATOMIC_ACQUIRE) == b->call;
#else
    return b->cancel != NULL && *b->cancel == b->call;
#endif
}

static void budget_step(void *self, ett_ctl *ctl, const int *stepped, int n_stepped)
{
    budget_ctl *b = self;
    if (cancelled(b)) {
        stop_all(ctl, "cancelled");
        return;
    }
    double now = ett_now() - b->started;
    if (b->has_last) {
        double dt = now - b->last_step;
        if (b->step_s != 0 && dt - b->step_s > b->stall_s) { /* a wait that may come again */
            b->stall_s = dt - b->step_s;
        }
        b->step_s = b->step_s == 0 ? dt : 0.7 * b->step_s + 0.3 * dt;
    } else {
        /* the first call follows the prefill: its cost a token, from the prefill itself (a round after
         * the first starts later than the strategy did), as the Python controller takes it */
        b->token_s = (ctl->prefill_s > 0 ? ctl->prefill_s : now) / b->prompt_tokens;
    }
    b->last_step = now;
    b->has_last = 1;
    for (int k = 0; k < n_stepped; k++) {
        int i = stepped[k];
        ett_row *r = &ctl->rows[i];
        if (r->finished) {
            continue;
        }
        if (b->answer_start[i] >= 0) {
            if (r->n_generated - b->think_count[i] >= ETT_ANSWER_TOKENS) {
                ett_stop(ctl, i, "length");
            }
        } else if (b->n_end > 0 && r->n_tokens >= b->n_end && !r->forced[r->n_tokens - 1]
                   && memcmp(r->tokens + r->n_tokens - b->n_end, b->end_ids, sizeof(int) * (size_t)b->n_end) == 0) {
            b->answer_start[i] = r->n_tokens - b->n_end; /* the delimiter is not thinking */
            b->think_count[i] = r->n_generated - b->n_end;
            if (answer_due(b, now, 1, ETT_ANSWER_TOKENS)) { /* its own answer may not end in time: the prefix */
                size_t end = strlen(b->pt->think_end), all = strlen(b->forced); /* forced may be cut short */
                ett_force(ctl, i, b->forced + (end < all ? end : all), 0);
            }
        } else if (r->n_generated >= b->budget) {
            force_answer(b, ctl, i);
        }
    }
    if (b->deadline_s >= 0) {
        double left = b->deadline_s - now;
        if (left < b->step_s) {
            stop_all(ctl, "deadline");
            return;
        }
        int thinking = 0;
        for (int i = 0; i < ctl->n; i++) {
            thinking += !ctl->rows[i].finished && b->answer_start[i] < 0 && ctl->pending[i] == NULL;
        }
        double forced_decode = thinking * b->forced_len * b->token_s; /* token_s is set: a step came */
        int answer_steps = ETT_ANSWER_TOKENS < ETT_ANSWER_STEPS ? ETT_ANSWER_TOKENS : ETT_ANSWER_STEPS;
        if (thinking && answer_due(b, now, thinking, answer_steps)) {
            if (left < forced_decode + b->step_s) { /* not even the forced text fits: stop on time */
                stop_all(ctl, "deadline");
                return;
            }
            for (int i = 0; i < ctl->n; i++) {
                if (!ctl->rows[i].finished && b->answer_start[i] < 0 && ctl->pending[i] == NULL) {
                    force_answer(b, ctl, i);
                }
            }
        }
    }
    if (b->first_finish && b->winner < 0) {
        int win = -1;
        for (int k = 0; k < n_stepped; k++) {
            const ett_row *r = &ctl->rows[stepped[k]];
            if (r->finish_reason != NULL && strcmp(r->finish_reason, "stop") == 0
                && (win < 0 || r->n_generated < ctl->rows[win].n_generated)) {
                win = stepped[k];
            }
        }
        if (win >= 0) {
            b->winner = win;
            stop_all(ctl, "first-finish");
        }
    }
}

/* -- aggregation ---------------------------------------------------------------------------- */
/* The vote over the rows order[0..k): each adds one to its answer's count and its weight
 * (exp(confidence) when weighted, else 1) to the answer's weight; the answer of the largest
 * weight wins, ties to the answer seen first. */
static void vote(edgetts_result *res, const int *order, int k, int weighted)
{
    res->n_votes = 0;
    for (int m = 0; m < k; m++) {
        const edgetts_row *r = &res->rows[order[m]];
        int j;
        for (j = 0; j < res->n_votes && strcmp(res->votes[j].answer, r->answer) != 0; j++) {
        }
        if (j == res->n_votes) {
            snprintf(res->votes[j].answer, EDGETTS_ANSWER_MAX, "%s", r->answer);
            res->votes[j].count = 0;
            res->votes[j].weight = 0.0;
            res->n_votes++;
        }
        res->votes[j].count++;
        res->votes[j].weight += weighted ? exp(r->confidence) : 1.0;
    }
    int best = -1;
    for (int j = 0; j < res->n_votes; j++) {
        if (best < 0 || res->votes[j].weight > res->votes[best].weight) {
            best = j;
        }
    }
    res->has_answer = best >= 0;
    snprintf(res->answer, EDGETTS_ANSWER_MAX, "%s", best >= 0 ? res->votes[best].answer : "");
}

/* Majority vote over the rows with an answer, in row order (weights of 1 are the counts). */
static void tally(edgetts_result *res)
{
    int order[EDGETTS_MAX_ROWS], k = 0;
    for (int i = 0; i < res->rows_used; i++) {
        if (res->rows[i].answer != NULL) {
            order[k++] = i;
        }
    }
    vote(res, order, k, 0);
}

/* DeepConf's lowest group confidence: the lowest mean log-probability over 16 consecutive tokens. */
static double lowest_window(const double *lps, int n)
{
    if (n == 0) {
        return -HUGE_VAL;
    }
    int w = n < 16 ? n : 16;
    double sum = 0.0, lowest;
    for (int i = 0; i < w; i++) {
        sum += lps[i];
    }
    lowest = sum;
    for (int i = w; i < n; i++) {
        sum += lps[i] - lps[i - w];
        lowest = sum < lowest ? sum : lowest;
    }
    return lowest / w;
}

/* Confidence-weighted vote (Weighted with its defaults): rows with an answer, most confident
 * first (stable), each adding exp(confidence) to its answer; ties to the answer seen first. */
static void weighted_tally(edgetts_result *res)
{
    int order[EDGETTS_MAX_ROWS], k = 0;
    for (int i = 0; i < res->rows_used; i++) {
        if (res->rows[i].answer == NULL) {
            continue;
        }
        int j = k++;
        while (j > 0 && res->rows[order[j - 1]].confidence < res->rows[i].confidence) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
    vote(res, order, k, 1);
}

/* P(leader truly leads) under Beta(a + 1, b + 1): a binomial tail (aggregate.beta_prob_leader). */
static double beta_prob_leader(int a, int b)
{
    int a1 = a + 1, b1 = b + 1, n = a1 + b1 - 1;
    long double term = 1.0L, sum = 0.0L; /* C(n, k) */
    for (int k = 0; k < a1; k++) {
        sum += term;
        term = term * (long double)(n - k) / (long double)(k + 1);
    }
    return (double)(sum / powl(2.0L, (long double)n));
}

static int adaptive_should_stop(const edgetts_result *res)
{
    int first = 0, second = 0;
    for (int j = 0; j < res->n_votes; j++) {
        int c = res->votes[j].count;
        if (c > first) {
            second = first;
            first = c;
        } else if (c > second) {
            second = c;
        }
    }
    return first > 0 && beta_prob_leader(first, second) > 0.95;
}

static int esc_should_stop(const edgetts_result *res, int from)
{
    const char *a0 = res->rows[from].answer;
    if (a0 == NULL) {
        return 0;
    }
    for (int i = from + 1; i < res->rows_used; i++) {
        if (res->rows[i].answer == NULL || strcmp(res->rows[i].answer, a0) != 0) {
            return 0;
        }
    }
    return 1;
}

static int round_sizes(const char *strategy, int n, int *sizes)
{
    int k = 0, total = 0;
    if (strcmp(strategy, "esc") == 0) {
        int w = n / 4 > 2 ? n / 4 : 2;
        for (; total + w <= n; total += w) {
            sizes[k++] = w;
        }
        if (n - total > 0) {
            sizes[k++] = n - total;
        }
    } else if (strcmp(strategy, "adaptive") == 0) {
        sizes[k++] = total = n < 4 ? n : 4;
        for (; total < n; total += sizes[k++]) {
            sizes[k] = n - total < 2 ? n - total : 2;
        }
    } else {
        sizes[k++] = strcmp(strategy, "single") == 0 ? 1 : n;
    }
    return k;
}

/* Appends one round's rows to the result as row traces (Strategy.row_trace). */
static edgetts_status add_rows(edgetts_result *res, const ett_point *pt, const budget_ctl *b, ett_row *rows, int n)
{
    for (int i = 0; i < n; i++) {
        edgetts_row *t = &res->rows[res->rows_used];
        ett_row *r = &rows[i];
        int at = b->answer_start[i] >= 0 ? b->answer_start[i] : r->n_tokens;
        memset(t, 0, sizeof *t);
        for (int k = 0; k < r->n_tokens; k++) {
            if (!r->forced[k]) {
                *(k < at ? &t->thinking_tokens : &t->answer_tokens) += 1;
            }
        }
        t->finish_reason = r->finish_reason;
        t->forced_answer = b->forced_answer[i];
        t->n_tokens = r->n_tokens;
        t->tokens = r->tokens;
        t->forced = r->forced;
        t->text = r->text ? r->text : calloc(1, 1);
        r->tokens = NULL;
        r->forced = NULL;
        r->text = NULL;
        res->rows_used++;
        int cut = pt->think_end[0] && b->answer_start[i] < 0 && strcmp(t->finish_reason, "stop") != 0;
        char answer[EDGETTS_ANSWER_MAX];
        if (t->text == NULL) {
            return EDGETTS_E_MEMORY;
        }
        if (!cut && ett_extract_answer(t->text, pt->think_start, pt->think_end, answer, sizeof answer)) {
            size_t len = strlen(answer) + 1;
            t->answer = malloc(len);
            if (t->answer == NULL) {
                return EDGETTS_E_MEMORY;
            }
            memcpy(t->answer, answer, len);
        }
        res->generated_tokens += t->thinking_tokens + t->answer_tokens;
        t->confidence = r->logprobs != NULL ? lowest_window(r->logprobs, r->n_logprobs) : 0.0;
    }
    return EDGETTS_OK;
}

/* One round: `size` rows from overall index `start`, under a copy of the call's controller `base`. */
static edgetts_status run_round(const ett_run *run, const budget_ctl *base, const char *prompt, int start, int size,
                                edgetts_result *res, int *winner, char *err, size_t err_len)
{
    budget_ctl b = *base;
    unsigned seeds[EDGETTS_MAX_ROWS];
    int ans[EDGETTS_MAX_ROWS], think[EDGETTS_MAX_ROWS], forced[EDGETTS_MAX_ROWS];
    int np = 0;
    ett_row *rows = NULL;
    b.answer_start = ans;
    b.think_count = think;
    b.forced_answer = forced;
    for (int i = 0; i < size; i++) {
        seeds[i] = run->seed + (unsigned)(start + i);
        ans[i] = -1;
        think[i] = forced[i] = 0;
    }
    ett_sampling sp = {1.0f, 1.0f, 0.0f, 0, run->budget + ETT_ANSWER_TOKENS, strcmp(run->strategy, "weighted") == 0};
    edgetts_status st = ett_sample(run->engine, prompt, size, &sp, seeds, budget_step, &b, &rows, &np, err, err_len);
    if (st != EDGETTS_OK) {
        return st;
    }
    res->prompt_tokens = np;
    st = add_rows(res, run->point, &b, rows, size);
    ett_rows_free(rows, size);
    *winner = b.winner;
    return st;
}

/* The number of tokens of `text` (no BOS), or -1 when out of memory. */
static int count_tokens(const ett_engine *e, const char *text)
{
    int *ids = NULL;
    int n = ett_tokenize(e, text, 0, &ids);
    free(ids);
    return n;
}

/* The controller's settings for every round of a call: the end-of-thinking tokens, the forced
 * text and its length, and the prompt's length (without BOS, plus one, as in Python). */
static edgetts_status budget_init(const ett_run *run, const char *prompt, int first_finish, double t0, budget_ctl *b,
                                  char *err, size_t err_len)
{
    const ett_point *pt = run->point;
    int *ids = NULL;
    memset(b, 0, sizeof *b);
    b->pt = pt;
    b->budget = run->budget;
    b->started = t0;
    b->deadline_s = run->deadline_ms > 0 ? run->deadline_ms / 1000.0 : -1.0;
    b->first_finish = first_finish;
    b->winner = -1;
    b->cancel = run->cancel;
    b->call = run->call;
    snprintf(b->forced, sizeof b->forced, "%s%s", pt->think_end, pt->answer_prefix);
    b->n_end = pt->think_end[0] ? ett_tokenize(run->engine, pt->think_end, 0, &ids) : 0;
    if (b->n_end > 0 && b->n_end <= 16) {
        memcpy(b->end_ids, ids, sizeof(int) * (size_t)b->n_end);
    }
    free(ids);
    if (b->n_end > 16) {
        snprintf(err, err_len, "the end-of-thinking delimiter is too long");
        return EDGETTS_E_ARGUMENT;
    }
    b->forced_len = count_tokens(run->engine, b->forced);
    b->prompt_tokens = count_tokens(run->engine, prompt) + 1;
    if (b->n_end < 0 || b->forced_len < 0 || b->prompt_tokens < 1) {
        snprintf(err, err_len, "out of memory");
        return EDGETTS_E_MEMORY;
    }
    return EDGETTS_OK;
}

static int any_reason(const edgetts_result *res, int from, const char *reason)
{
    for (int i = from; i < res->rows_used; i++) {
        if (strcmp(res->rows[i].finish_reason, reason) == 0) {
            return 1;
        }
    }
    return 0;
}

edgetts_status ett_run_strategy(const ett_run *run, const char *question, edgetts_result *res, char *err,
                                size_t err_len)
{
    const char *s = run->strategy;
    int sizes[EDGETTS_MAX_ROWS], n_rounds, winner = -1;
    int first_finish = strcmp(s, "first-finish") == 0;
    double t0 = ett_now();
    edgetts_status st = EDGETTS_OK;
    int weighted = strcmp(s, "weighted") == 0;
    budget_ctl base;
    if (strcmp(s, "single") && strcmp(s, "majority") && strcmp(s, "esc") && strcmp(s, "adaptive") && !first_finish
        && !weighted) {
        snprintf(err, err_len, "strategy %s is not in the C runtime (single, majority, esc, adaptive, first-finish, "
                 "weighted)", s);
        return EDGETTS_E_ARGUMENT;
    }
    size_t qlen = strlen(question);
    char *prompt = malloc(strlen(run->point->prompt_prefix) + qlen + strlen(run->point->prompt_suffix) + 1);
    res->rows = calloc((size_t)run->n, sizeof *res->rows);
    if (prompt == NULL || res->rows == NULL) {
        free(prompt);
        snprintf(err, err_len, "out of memory");
        return EDGETTS_E_MEMORY;
    }
    sprintf(prompt, "%s%s%s", run->point->prompt_prefix, question, run->point->prompt_suffix);
    st = budget_init(run, prompt, first_finish, t0, &base, err, err_len);
    if (st != EDGETTS_OK) {
        free(prompt);
        return st;
    }
    n_rounds = round_sizes(s, run->n, sizes);
    for (int k = 0; k < n_rounds; k++) {
        int from = res->rows_used;
        if (run->deadline_ms > 0 && from > 0) {
            double spent = (ett_now() - t0) * 1000;
            if (spent + 1.5 * spent / from * sizes[k] > run->deadline_ms) { /* a round costs about the last */
                res->early_stop = "deadline";
                break;
            }
        }
        st = run_round(run, &base, prompt, from, sizes[k], res, &winner, err, err_len);
        if (st != EDGETTS_OK) {
            break;
        }
        if (any_reason(res, from, "cancelled")) {
            st = EDGETTS_E_CANCELLED;
            snprintf(err, err_len, "cancelled");
            res->early_stop = "cancelled";
            break;
        }
        if (any_reason(res, from, "deadline")) {
            res->early_stop = "deadline";
            break;
        }
        tally(res);
        if (n_rounds > 1 && res->rows_used < run->n) {
            int stop = strcmp(s, "esc") == 0 ? esc_should_stop(res, from) : adaptive_should_stop(res);
            if (stop) {
                res->early_stop = strcmp(s, "esc") == 0 ? "esc" : "adaptive";
                break;
            }
        }
    }
    free(prompt);
    if (st != EDGETTS_OK && st != EDGETTS_E_CANCELLED) {
        return st;
    }
    if (weighted) {
        weighted_tally(res);
    } else {
        tally(res);
    }
    if (first_finish) {
        int win = winner;
        if (win < 0) { /* nobody finished on their own: the shortest answered row */
            int any = 0;
            for (int i = 0; i < res->rows_used; i++) {
                any |= res->rows[i].answer != NULL;
            }
            for (int i = 0; i < res->rows_used; i++) {
                if ((!any || res->rows[i].answer != NULL)
                    && (win < 0 || res->rows[i].n_tokens < res->rows[win].n_tokens)) {
                    win = i;
                }
            }
        } else {
            res->early_stop = "first-finish";
        }
        const char *a = win >= 0 ? res->rows[win].answer : NULL;
        res->has_answer = a != NULL;
        snprintf(res->answer, EDGETTS_ANSWER_MAX, "%s", a ? a : "");
        res->n_votes = 0;
        if (a != NULL) {
            snprintf(res->votes[0].answer, EDGETTS_ANSWER_MAX, "%s", a);
            res->votes[0].count = 1;
            res->votes[0].weight = 1.0;
            res->n_votes = 1;
        }
    }
    if (res->early_stop == NULL && any_reason(res, 0, "deadline")) {
        res->early_stop = "deadline";
    }
    res->latency_ms = (ett_now() - t0) * 1000;
    res->deadline_met = run->deadline_ms > 0 ? res->latency_ms <= run->deadline_ms : -1;
    return st;
}
