/* Declarations shared by the library's sources; not installed. */
#ifndef EDGETTS_INTERNAL_H
#define EDGETTS_INTERNAL_H

#include <stddef.h>

#include "edgetts.h"
#include "llama.h"

/* The constants the Python runtime and this one share (the ETT_ names checked below), written by
 * build-c from the Python values next to frontier.c (edgetts.export.build_c.constants_h): one source
 * for both.  A header an older build-c wrote lacks the newer ones: the build stops and says so. */
#include "edgetts_constants.h"
#if !defined(ETT_ANSWER_TOKENS) || !defined(ETT_ANSWER_STEPS) || !defined(ETT_ANSWER_SAFETY) \
    || !defined(ETT_PROMPT_RESERVE) || !defined(ETT_FORCED_SLACK) || !defined(ETT_RUNS) || !defined(ETT_MAX_THREADS) \
    || !defined(ETT_PRICE_FLOOR) || !defined(ETT_PRICE_STEP) || !defined(ETT_PRICE_WINDOW) || !defined(ETT_PRICE_CEILING)
#error "edgetts_constants.h was written by an older edgetts build-c than these sources: run edgetts build-c again"
#endif

/* A frontier point as build-c embeds it (frontier.c is generated). */
typedef struct ett_point {
    edgetts_point_info info;
    double typical_ms;                                    /* its profiled median latency (recalibration) */
    int has_threads, threads, has_gpu_layers, gpu_layers; /* profiled_with: the settings it was measured under */
    int n_ctx, n_batch, flash_attn;                       /* 0 (flash_attn: -1, auto) when absent */
    const char *think_start, *think_end, *answer_prefix;  /* the reasoning family */
    const char *prompt_prefix, *prompt_suffix;            /* the prompt around the question */
    int one_row;                                          /* its strategy runs one row whatever n (single) */
} ett_point;

extern const ett_point ett_frontier[];
extern const int ett_n_frontier;
extern const char ett_config_digest[];

/* -- engine.c: the batched sampling loop over llama.cpp ------------------------------------- */
typedef struct ett_engine {
    struct llama_model *model;
    struct llama_context *ctx;
    const struct llama_vocab *vocab;
    llama_memory_t mem;
    struct llama_batch batch;
    int n_ctx, n_batch, batch_cap, max_rows, add_bos;
    char key[1200]; /* path and options: points with the same key share the engine */
} ett_engine;

typedef struct ett_row {
    int *tokens;
    unsigned char *forced;
    int n_tokens, cap, n_generated, finished;
    const char *finish_reason;
    char *text;
    size_t text_len, text_cap;
    double *logprobs; /* of every sampled token (end of generation included), when asked for */
    int n_logprobs, lp_cap;
} ett_row;

/* What a controller may do after each step (engines/base.py Control). */
typedef struct ett_ctl {
    ett_row *rows;
    int n;
    char **pending;  /* forced text queued per row, or NULL */
    int *extra;      /* extra sampled tokens granted per row */
    double prefill_s; /* the prompt's decode, alone (Control.prefill_s): a token's cost for the controller */
} ett_ctl;

typedef void (*ett_controller)(void *self, ett_ctl *ctl, const int *stepped, int n_stepped);

typedef struct ett_sampling {
    float temperature, top_p, min_p;
    int top_k;
    int max_tokens;
    int logprobs; /* record each sampled token's log-probability */
} ett_sampling;

edgetts_status ett_engine_open(ett_engine *e, const char *path, int max_rows, int max_tokens, int threads,
                               int gpu_layers, int n_ctx_opt, int n_batch_opt, int flash_attn, char *err,
                               size_t err_len);
void ett_engine_close(ett_engine *e);
void ett_quiet_log(void); /* llama.cpp logs errors only (everything with EDGETTS_VERBOSE set) */
int ett_tokenize(const ett_engine *e, const char *text, int add_bos, int **out); /* count, or -1 */
/* Samples n rows of `prompt`; rows[i] is seeded seeds[i]; the caller frees rows with ett_rows_free. */
edgetts_status ett_sample(ett_engine *e, const char *prompt, int n, const ett_sampling *sp, const unsigned *seeds,
                          ett_controller ctl_fn, void *ctl_self, ett_row **rows_out, int *prompt_tokens,
                          char *err, size_t err_len);
void ett_rows_free(ett_row *rows, int n);
void ett_stop(ett_ctl *ctl, int row, const char *reason);
int ett_force(ett_ctl *ctl, int row, const char *text, int extra_tokens);

/* -- extract.c ------------------------------------------------------------------------------ */
/* The final answer of `text` into out (cap bytes); 0 when it states none.  grading.extract_answer. */
int ett_extract_answer(const char *text, const char *think_start, const char *think_end, char *out, size_t cap);

/* -- pricing.c: a mean budget per answer, held by the price (edgetts.runtime.pricing.MeanBudget) -- */
typedef struct ett_budget {
    double budget;  /* mean cost per answer to hold; 0: none */
    int joules;     /* costs are joules (the caller's meter) and points are priced at their energy_j */
    double mean;    /* the recent mean cost, once has_mean */
    int has_mean;
    double ceiling; /* the highest price it sets */
} ett_budget;

/* The price from which the cheapest point (by latency, or energy with joules) is worth the most. */
double ett_cheapest_price(int joules);
/* Starts holding `budget` (0: stop); EDGETTS_E_ARGUMENT for a negative or infinite budget, or joules
 * where a point has no energy_j. */
edgetts_status ett_budget_start(ett_budget *b, double budget, int joules);
/* Counts one answer's cost; returns the price that follows `price`. */
double ett_budget_observe(ett_budget *b, double cost, double price);

/* -- strategies.c --------------------------------------------------------------------------- */
typedef struct ett_run {
    ett_engine *engine;
    const ett_point *point;
    const char *strategy;
    int n, budget;
    double deadline_ms; /* <= 0: none */
    unsigned seed;
    volatile int *cancel; /* holds the id of the call edgetts_cancel stopped */
    int call;             /* this call's id (never 0) */
} ett_run;

edgetts_status ett_run_strategy(const ett_run *run, const char *question, edgetts_result *res, char *err,
                                size_t err_len);
double ett_now(void);
void ett_decoded(void); /* counts a llama_decode, for the step clock of the parity tests (ett_now) */

#endif
