/* The runtime: the embedded frontier, its engines, the policy and the public API.
 *
 * edgetts_open opens one llama.cpp engine per distinct model file and engine options of the
 * frontier, each sized for the frontier's largest n and budget (as the Python executor sizes
 * its engines when it does not batch requests together).  edgetts_answer asks the policy for a point (the most accurate whose
 * profiled latency times the slowdown fits the deadline; ties to the faster point; when
 * nothing fits, the fastest point within the energy limit), runs the point's strategy with
 * the deadline, and feeds the measured latency back: the slowdown is the median, over the last
 * ETT_RUNS runs, of latency over the point's profiled median, never below 1 (as
 * edgetts.runtime.Policy.observe; against the median an ordinary run counts about 1 whatever the
 * spread of the point's latencies, where an average against the p95 sinks below 1 and picks
 * points that run late).  With a price on compute (edgetts_set_price, or a mean budget that moves it
 * after each answer, pricing.c) the point that fits and maximizes accuracy minus price x cost wins.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "utf8.h"

struct edgetts_runtime {
    ett_engine *engines;
    int n_engines;
    int *engine_of; /* per point */
    int max_n, max_budget;
    double slowdown;
    double price; /* accuracy per unit of cost (edgetts_set_price; moved by a mean budget) */
    ett_budget budget; /* a mean cost per answer to hold (edgetts_set_mean_budget), or none */
    double runs[ETT_RUNS]; /* the last runs' latency over their point's median, oldest first */
    int n_runs;
    volatile int cancel;  /* the id of the call a cancel stopped (0: none) */
    volatile int running; /* the id of the call running now (0: none) */
    int calls;            /* ids handed out so far */
    char err[1024];
    char notes[1024];
};

static pthread_once_t backend_once = PTHREAD_ONCE_INIT;

static void backend_init(void)
{
    ett_quiet_log();
    llama_backend_init();
}

int edgetts_n_points(void)
{
    return ett_n_frontier;
}

const edgetts_point_info *edgetts_point_at(int index)
{
    return index >= 0 && index < ett_n_frontier ? &ett_frontier[index].info : NULL;
}

const char *edgetts_config_digest(void)
{
    return ett_config_digest;
}

void edgetts_options_init(edgetts_options *opts)
{
    memset(opts, 0, sizeof *opts);
    opts->gpu_layers = EDGETTS_GPU_LAYERS_AUTO;
}

const char *edgetts_notes(const edgetts_runtime *rt)
{
    return rt != NULL ? rt->notes : "";
}

static void add_note(edgetts_runtime *rt, const char *fmt, ...)
{
    size_t used = strlen(rt->notes);
    if (used + 2 >= sizeof rt->notes) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rt->notes + used, sizeof rt->notes - used - 1, fmt, ap);
    va_end(ap);
    used = strlen(rt->notes);
    rt->notes[used] = '\n';
    rt->notes[used + 1] = '\0';
}

/* Threads when the caller names none: EDGETTS_THREADS, else every online core but one (the
 * Python runtime's default, under which profiles measure). */
static int default_threads(void)
{
    const char *env = getenv("EDGETTS_THREADS");
    if (env != NULL && *env != '\0') {
        char *end;
        long v = strtol(env, &end, 10);
        if (*end == '\0' && v >= 1 && v <= ETT_MAX_THREADS) {
            return (int)v;
        }
    }
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    return cores > 1 ? (int)cores - 1 : 1;
}

/* The n_gpu_layers llama.cpp gets: auto is every layer (-1) where it can offload, none otherwise;
 * an explicit request a CPU-only build cannot honour runs on the CPU, said once in the notes. */
static int gpu_layers_for(edgetts_runtime *rt, int requested)
{
    if (llama_supports_gpu_offload()) {
        return requested == EDGETTS_GPU_LAYERS_AUTO ? -1 : requested;
    }
    if (requested != EDGETTS_GPU_LAYERS_AUTO && requested != 0) {
        add_note(rt, "warning: gpu_layers=%d asks for GPU offload, but this llama.cpp build has no GPU backend: "
                     "running on the CPU", requested);
    }
    return 0;
}

const char *edgetts_status_name(edgetts_status status)
{
    static const char *names[] = {"ok", "bad argument", "config mismatch", "bad model", "no context",
                                  "question too long", "decode failed", "out of memory", "cancelled",
                                  "deadline too short"};
    return (unsigned)status < sizeof names / sizeof names[0] ? names[status] : "unknown";
}

const char *edgetts_last_error(const edgetts_runtime *rt)
{
    return rt != NULL ? rt->err : "no runtime";
}

static void store(volatile int *where, int value)
{
#if defined(__GNUC__) || defined(__clang__)
    __atomic_store_n(where, value, __ATOMIC_RELEASE);
#else
    *where = value;
#endif
}

static int load(volatile int *where)
{
#if defined(__GNUC__) || defined(__clang__)
    return __atomic_load_n(where, __ATOMIC_ACQUIRE);
#else
    return *where;
#endif
}

static void clear_cancel(edgetts_runtime *rt)
{
    store(&rt->cancel, 0);
}

/* A call that fails its checks: the message, and a pending cancel cleared as on every return. */
static edgetts_status fail(edgetts_runtime *rt, edgetts_status st, const char *fmt, ...)
{
    va_list ap;
    clear_cancel(rt);
    va_start(ap, fmt);
    vsnprintf(rt->err, sizeof rt->err, fmt, ap);
    va_end(ap);
    return st;
}

/* FNV-1a 64 of a file's bytes, as build-c computes it for the embedded config. */
static int file_digest(const char *path, char *hex)
{
    unsigned long long h = 14695981039346656037ULL;
    int c;
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return 0;
    }
    while ((c = fgetc(f)) != EOF) {
        h = (h ^ (unsigned long long)(unsigned char)c) * 1099511628211ULL;
    }
    fclose(f);
    snprintf(hex, 17, "%016llx", h);
    return 1;
}

static void model_path(const edgetts_options *o, const char *model, char *out, size_t cap)
{
    if (o->model_dir != NULL && o->model_dir[0]) {
        const char *base = strrchr(model, '/');
        snprintf(out, cap, "%s/%s", o->model_dir, base ? base + 1 : model);
    } else {
        snprintf(out, cap, "%s", model);
    }
}

edgetts_status edgetts_open(const edgetts_options *opts, edgetts_runtime **out, char *err, size_t err_len)
{
    edgetts_options defaults;
    edgetts_status st = EDGETTS_OK;
    char tmp[1024] = "", path[1024], key[1200], hex[17];
    if (out == NULL) {
        snprintf(err ? err : tmp, err ? err_len : sizeof tmp, "out is NULL");
        return EDGETTS_E_ARGUMENT;
    }
    *out = NULL;
    if (opts == NULL) {
        edgetts_options_init(&defaults);
        opts = &defaults;
    }
    if (err == NULL) {
        err = tmp;
        err_len = sizeof tmp;
    }
    if (opts->config_path != NULL) {
        if (!file_digest(opts->config_path, hex)) {
            snprintf(err, err_len, "%s: no such file", opts->config_path);
            return EDGETTS_E_CONFIG;
        }
        if (strcmp(hex, ett_config_digest) != 0) {
            snprintf(err, err_len, "%s: not the config this runtime was built from (rebuild with edgetts build-c)",
                     opts->config_path);
            return EDGETTS_E_CONFIG;
        }
    }
    edgetts_runtime *rt = calloc(1, sizeof *rt);
    if (rt == NULL) {
        snprintf(err, err_len, "out of memory");
        return EDGETTS_E_MEMORY;
    }
    rt->slowdown = 1.0;
    rt->engines = calloc((size_t)ett_n_frontier, sizeof *rt->engines);
    rt->engine_of = calloc((size_t)ett_n_frontier, sizeof(int));
    if (rt->engines == NULL || rt->engine_of == NULL) {
        edgetts_close(rt);
        snprintf(err, err_len, "out of memory");
        return EDGETTS_E_MEMORY;
    }
    for (int i = 0; i < ett_n_frontier; i++) {
        const edgetts_point_info *p = &ett_frontier[i].info;
        rt->max_n = p->n > rt->max_n ? p->n : rt->max_n;
        rt->max_budget = p->budget > rt->max_budget ? p->budget : rt->max_budget;
    }
    pthread_once(&backend_once, backend_init);
    if (opts->threads < 0 || opts->threads > ETT_MAX_THREADS || opts->gpu_layers < EDGETTS_GPU_LAYERS_AUTO) {
        edgetts_close(rt);
        snprintf(err, err_len, "threads must be from 0 (the default) to %d (llama.cpp's limit) and gpu_layers >= -1 "
                 "(or EDGETTS_GPU_LAYERS_AUTO)", ETT_MAX_THREADS);
        return EDGETTS_E_ARGUMENT;
    }
    /* The caller's settings run every engine; the ones a point was profiled with are compared only. */
    int threads = opts->threads > 0 ? opts->threads : default_threads();
    int gpu = gpu_layers_for(rt, opts->gpu_layers);
    for (int i = 0; i < ett_n_frontier && st == EDGETTS_OK; i++) {
        const ett_point *p = &ett_frontier[i];
        model_path(opts, p->info.model, path, sizeof path);
        snprintf(key, sizeof key, "%s|%d|%d|%d|%d|%d", path, threads, gpu, p->n_ctx, p->n_batch, p->flash_attn);
        int j;
        for (j = 0; j < rt->n_engines && strcmp(rt->engines[j].key, key) != 0; j++) {
        }
        if (j == rt->n_engines) {
            st = ett_engine_open(&rt->engines[j], path, rt->max_n, rt->max_budget + ETT_ANSWER_TOKENS, threads, gpu,
                                 p->n_ctx, p->n_batch, p->flash_attn, err, err_len);
            if (st != EDGETTS_OK) {
                break;
            }
            snprintf(rt->engines[j].key, sizeof rt->engines[j].key, "%s", key);
            rt->n_engines++;
            int layers = llama_model_n_layer(rt->engines[j].model);
            int on_gpu = gpu < 0 ? layers + 1 : (gpu < layers + 1 ? gpu : layers + 1);
            if ((p->has_threads && p->threads != threads) || (p->has_gpu_layers && p->gpu_layers != on_gpu)) {
                add_note(rt, "note: %s: latencies were profiled with threads=%d, gpu_layers=%d; running with "
                             "threads=%d, gpu_layers=%d", p->info.model, p->threads, p->gpu_layers, threads, on_gpu);
            }
        }
        rt->engine_of[i] = j;
    }
    if (st != EDGETTS_OK) {
        edgetts_close(rt);
        return st;
    }
    *out = rt;
    return EDGETTS_OK;
}

void edgetts_close(edgetts_runtime *rt)
{
    if (rt == NULL) {
        return;
    }
    for (int i = 0; i < rt->n_engines; i++) {
        ett_engine_close(&rt->engines[i]);
    }
    free(rt->engines);
    free(rt->engine_of);
    free(rt);
}

void edgetts_cancel(edgetts_runtime *rt)
{
    /* Cancellation belongs to a call: the id of the one running now, none when no call runs.  A
     * cancel that loses a race with the call's return names a finished call: the next call has
     * another id and is not touched. */
    if (rt != NULL) {
        int call = load(&rt->running);
        if (call != 0) {
            store(&rt->cancel, call);
        }
    }
}

/* -- policy ---------------------------------------------------------------------------------- */
static int within_limits(const edgetts_point_info *p, double energy_j)
{
    return !(energy_j > 0 && (p->energy_j < 0 || p->energy_j > energy_j));
}

edgetts_status edgetts_set_price(edgetts_runtime *rt, double price)
{
    if (rt == NULL || !(price >= 0) || isinf(price)) {
        return EDGETTS_E_ARGUMENT;
    }
    rt->price = price;
    return EDGETTS_OK;
}

double edgetts_price(const edgetts_runtime *rt)
{
    return rt != NULL ? rt->price : 0.0;
}

edgetts_status edgetts_set_mean_budget(edgetts_runtime *rt, double budget, edgetts_cost cost)
{
    if (rt == NULL || (cost != EDGETTS_COST_MS && cost != EDGETTS_COST_J)) {
        return EDGETTS_E_ARGUMENT;
    }
    if (ett_budget_start(&rt->budget, budget, cost == EDGETTS_COST_J) != EDGETTS_OK) {
        return fail(rt, EDGETTS_E_ARGUMENT, !(budget >= 0) || isinf(budget)
                    ? "the mean budget must be a finite number >= 0 (0: none), got %g"
                    : "a mean budget in joules prices each point's energy_j, and a point has none (budget %g): "
                      "profile where an energy meter exists", budget);
    }
    return EDGETTS_OK;
}

double edgetts_spent(edgetts_runtime *rt, double cost)
{
    if (rt == NULL) {
        return 0.0;
    }
    rt->price = ett_budget_observe(&rt->budget, cost, rt->price);
    return rt->price;
}

int edgetts_policy_select(const edgetts_runtime *rt, double deadline_ms, double energy_j, int *miss)
{
    double slowdown = rt != NULL ? rt->slowdown : 1.0;
    double price = rt != NULL ? rt->price : 0.0;
    int best = -1;
    double best_worth = 0.0;
    for (int i = 0; i < ett_n_frontier; i++) {
        const edgetts_point_info *p = &ett_frontier[i].info;
        double ms = p->latency_ms * slowdown;
        /* as Policy.select: accuracy less the price of its time (of its energy, under a budget in joules) */
        double worth = p->accuracy - price * (rt != NULL && rt->budget.joules ? p->energy_j : ms);
        int fits = within_limits(p, energy_j) && ms <= deadline_ms;
        if (fits && (best < 0 || worth > best_worth)) {
            best = i;
            best_worth = worth;
        }
    }
    if (miss != NULL) {
        *miss = best < 0;
    }
    if (best >= 0) {
        return best;
    }
    for (int i = 0; i < ett_n_frontier; i++) {
        if (within_limits(&ett_frontier[i].info, energy_j)) {
            return i;
        }
    }
    return 0;
}

void edgetts_policy_observe(edgetts_runtime *rt, int index, double latency_ms)
{
    if (rt == NULL || index < 0 || index >= ett_n_frontier || !(latency_ms > 0) || isinf(latency_ms)) {
        return;
    }
    double typical = ett_frontier[index].typical_ms;
    if (rt->n_runs == ETT_RUNS) {
        memmove(rt->runs, rt->runs + 1, (ETT_RUNS - 1) * sizeof rt->runs[0]);
        rt->n_runs--;
    }
    rt->runs[rt->n_runs++] = latency_ms / (typical > 1e-9 ? typical : 1e-9);
    double sorted[ETT_RUNS];
    int n = rt->n_runs;
    for (int i = 0; i < n; i++) { /* insertion sort: at most ETT_RUNS values */
        double v = rt->runs[i];
        int j = i;
        for (; j > 0 && sorted[j - 1] > v; j--) {
            sorted[j] = sorted[j - 1];
        }
        sorted[j] = v;
    }
    double median = n % 2 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
    rt->slowdown = median > 1.0 ? median : 1.0;
}

double edgetts_policy_slowdown(const edgetts_runtime *rt)
{
    return rt != NULL ? rt->slowdown : 1.0;
}

/* -- requests -------------------------------------------------------------------------------- */
void edgetts_result_free(edgetts_result *res)
{
    if (res == NULL) {
        return;
    }
    if (res->rows != NULL) {
        for (int i = 0; i < res->rows_used; i++) {
            free(res->rows[i].tokens);
            free(res->rows[i].forced);
            free(res->rows[i].text);
            free(res->rows[i].answer);
        }
        free(res->rows);
    }
    memset(res, 0, sizeof *res);
}

static edgetts_status run(edgetts_runtime *rt, int index, const char *question, int n, int budget,
                          double deadline_ms, unsigned seed, edgetts_result *res)
{
    const ett_point *p = &ett_frontier[index];
    int blank = 1;
    for (const char *c = question; *c; c++) {
        blank &= *c == ' ' || (*c >= '\t' && *c <= '\r');
    }
    if (blank) {
        return fail(rt, EDGETTS_E_ARGUMENT, "the question is empty");
    }
    if (!ett_utf8_valid(question)) {
        return fail(rt, EDGETTS_E_ARGUMENT, "the question is not valid UTF-8 text");
    }
    rt->calls = rt->calls < 0x3fffffff ? rt->calls + 1 : 1;
    ett_run r = {&rt->engines[rt->engine_of[index]], p, p->info.strategy, n, budget,
                 deadline_ms >= EDGETTS_NO_DEADLINE ? -1.0 : deadline_ms, seed, &rt->cancel, rt->calls};
    store(&rt->running, rt->calls);
    res->point_index = index;
    res->point_id = p->info.id;
    res->strategy = p->info.strategy;
    res->n = n;
    res->budget = budget;
    edgetts_status st = ett_run_strategy(&r, question, res, rt->err, sizeof rt->err);
    store(&rt->running, 0);
    clear_cancel(rt);
    if (st != EDGETTS_OK && st != EDGETTS_E_CANCELLED) {
        edgetts_result_free(res);
    }
    return st;
}

static edgetts_status check(edgetts_runtime *rt, const char *question, double deadline_ms, edgetts_result *res)
{
    if (res != NULL) {
        memset(res, 0, sizeof *res);
    }
    if (rt == NULL) {
        return EDGETTS_E_ARGUMENT; /* no runtime to hold a message */
    }
    if (question == NULL || res == NULL) {
        return fail(rt, EDGETTS_E_ARGUMENT, "question and result must not be NULL");
    }
    if (!(deadline_ms > 0)) {
        return fail(rt, EDGETTS_E_ARGUMENT, "deadline_ms must be positive, got %g", deadline_ms);
    }
    return EDGETTS_OK;
}

edgetts_status edgetts_answer(edgetts_runtime *rt, const char *question, double deadline_ms, double energy_j,
                              unsigned int seed, edgetts_result *res)
{
    edgetts_status st = check(rt, question, deadline_ms, res);
    if (st != EDGETTS_OK) {
        return st;
    }
    /* The refusal rule of every runtime (edgetts.runtime.Policy.check_deadline): a deadline shorter
     * than the fastest point (within the energy limit) needs on an idle device is the caller's. */
    int fastest = -1, fastest_limited = -1;
    for (int k = 0; k < ett_n_frontier; k++) {
        const edgetts_point_info *q = &ett_frontier[k].info;
        if (fastest < 0 || q->latency_ms < ett_frontier[fastest].info.latency_ms) {
            fastest = k;
        }
        int within = energy_j <= 0.0 || (q->energy_j >= 0.0 && q->energy_j <= energy_j);
        if (within && (fastest_limited < 0 || q->latency_ms < ett_frontier[fastest_limited].info.latency_ms)) {
            fastest_limited = k;
        }
    }
    fastest = fastest_limited >= 0 ? fastest_limited : fastest;
    if (deadline_ms < ett_frontier[fastest].info.latency_ms) {
        return fail(rt, EDGETTS_E_DEADLINE, "deadline_ms=%g is shorter than the fastest point needs on an idle device "
                    "(%s: %.0f ms); give a deadline of at least that", deadline_ms, ett_frontier[fastest].info.id,
                    ett_frontier[fastest].info.latency_ms);
    }
    int miss = 0;
    int i = edgetts_policy_select(rt, deadline_ms, energy_j, &miss);
    const edgetts_point_info *p = &ett_frontier[i].info;
    st = run(rt, i, question, p->n, p->budget, deadline_ms, seed, res);
    res->predicted_miss = miss;
    if (st == EDGETTS_OK) {
        edgetts_policy_observe(rt, i, res->latency_ms);
        if (!rt->budget.joules) { /* a budget in joules is fed by the caller's meter (edgetts_spent) */
            edgetts_spent(rt, res->latency_ms);
        }
    }
    return st;
}

edgetts_status edgetts_run_point(edgetts_runtime *rt, int index, const char *question, int n, int budget,
                                 double deadline_ms, unsigned int seed, edgetts_result *res)
{
    edgetts_status st = check(rt, question, deadline_ms, res);
    if (st != EDGETTS_OK) {
        return st;
    }
    if (index < 0 || index >= ett_n_frontier) {
        return fail(rt, EDGETTS_E_ARGUMENT, "point %d is not in the frontier (0..%d)", index, ett_n_frontier - 1);
    }
    if (n > 1 && ett_frontier[index].one_row) { /* as Python's run and serve */
        return fail(rt, EDGETTS_E_ARGUMENT, "point %d runs %s, one row; n=%d would be ignored", index,
                    ett_frontier[index].info.strategy, n);
    }
    n = n > 0 ? n : ett_frontier[index].info.n;
    budget = budget > 0 ? budget : ett_frontier[index].info.budget;
    if (n > rt->max_n) {
        return fail(rt, EDGETTS_E_ARGUMENT, "n must be at most %d (the frontier's largest n), got %d", rt->max_n, n);
    }
    if (budget > rt->max_budget) {
        return fail(rt, EDGETTS_E_ARGUMENT, "budget must be at most %d (the frontier's largest budget), got %d",
                    rt->max_budget, budget);
    }
    return run(rt, index, question, n, budget, deadline_ms, seed, res);
}
