/* libedgetts: test-time scaling on llama.cpp, for C, C++ and Rust programs.
 *
 * The frontier of a Pareto config (edgetts.pareto/v1) is compiled into the library by
 * `edgetts build-c CONFIG --out DIR`.  A runtime opens every model the frontier names
 * (llama.cpp GGUF files), then answers questions: the policy picks the most accurate point
 * whose predicted latency fits the deadline (and energy limit), and the point's strategy
 * (single, majority, esc, adaptive, first-finish, weighted) runs its rows batched over one
 * prefill of the prompt (esc and adaptive: one batch and prefill per round), forcing the end of
 * thinking and the answer prefix at the thinking budget and answering early when the deadline
 * comes close (while the forced text, the answer's steps with a safety margin and one wait like
 * the longest seen still fit; a row that ends its thinking by itself with no time for an answer
 * of its own gets the answer prefix at once).  With the same config and seed, the rows are token
 * for token those of the Python runtime (under a binding deadline too, given the same clock).
 *
 * Settings: the caller's threads and GPU layers (edgetts_options) run every engine; the ones a
 * point was profiled with are only compared (edgetts_notes), never applied.
 *
 * Errors: every function returns an edgetts_status; the message of the last failure on a
 * runtime is edgetts_last_error(rt) (or the `err` buffer of edgetts_open).  The library never
 * aborts or exits.
 *
 * Threads: a runtime is used by one thread at a time (answer, run_point, select, observe,
 * close); different runtimes may run in different threads at once.  edgetts_cancel() may be
 * called from any thread while another thread runs answer or run_point on the same runtime:
 * every row stops at the next decode step and the call returns EDGETTS_CANCELLED with the rows
 * so far.  A cancel belongs to the call running when it comes: one that comes while no call runs,
 * or after the call it was meant for returned, does nothing (a watchdog that cancels after 50 ms
 * never stops a later call).  The frontier functions (edgetts_n_points, edgetts_point_at, edgetts_config_digest)
 * and edgetts_status_name are thread-safe.
 *
 * Results: call edgetts_result_free after every edgetts_answer or edgetts_run_point, whatever
 * it returned (a failed call leaves the result empty; freeing an empty result is a no-op).
 */
#ifndef EDGETTS_H
#define EDGETTS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EDGETTS_MAX_ROWS 64
#define EDGETTS_ANSWER_MAX 256 /* bytes of an answer, with its terminating NUL */

typedef enum edgetts_status {
    EDGETTS_OK = 0,
    EDGETTS_E_ARGUMENT = 1,   /* a bad argument: deadline <= 0, n out of range, NULL pointer, a question
                                 empty or not UTF-8, ... */
    EDGETTS_E_CONFIG = 2,     /* the config file is not the one this library was built from */
    EDGETTS_E_MODEL = 3,      /* a model file is missing, not a GGUF, or corrupt */
    EDGETTS_E_CONTEXT = 4,    /* llama.cpp could not create a context (out of memory?) */
    EDGETTS_E_TOO_LONG = 5,   /* the question does not fit the context */
    EDGETTS_E_DECODE = 6,     /* llama_decode failed on the prompt */
    EDGETTS_E_MEMORY = 7,     /* an allocation failed */
    EDGETTS_E_CANCELLED = 8,  /* edgetts_cancel() stopped the call */
    EDGETTS_E_DEADLINE = 9    /* edgetts_answer: no point meets the deadline even on an idle device */
} edgetts_status;

typedef struct edgetts_runtime edgetts_runtime;

/* One frontier point, as embedded at build time. */
typedef struct edgetts_point_info {
    const char *id;
    const char *model;     /* the GGUF file the point runs (absolute path at build time) */
    const char *strategy;  /* single, majority, esc, adaptive, first-finish, weighted */
    int n;                 /* rows */
    int budget;            /* thinking tokens per row */
    double latency_ms;     /* the config's latency quantile */
    double accuracy;
    double energy_j;       /* -1 when not measured */
    double memory_mb;      /* -1 when not measured */
} edgetts_point_info;

typedef struct edgetts_options {
    const char *config_path; /* optional: checked against the embedded config (same bytes) */
    const char *model_dir;   /* optional: look for each model's file name in this directory */
    int threads;             /* llama.cpp threads, at most 512; 0: $EDGETTS_THREADS, else all online cores but one */
    int gpu_layers;          /* EDGETTS_GPU_LAYERS_AUTO (the default): every layer where llama.cpp can
                                offload, none otherwise; -1: all layers; N >= 0: that many */
} edgetts_options;

#define EDGETTS_GPU_LAYERS_AUTO (-2)

/* One row of a result (for inspection and tests). */
typedef struct edgetts_row {
    int *tokens;            /* sampled and forced tokens in order */
    unsigned char *forced;  /* 1 where the token was forced */
    int n_tokens;
    char *text;             /* the row's text (bytes as llama.cpp renders the tokens) */
    char *answer;           /* NULL: the row stated no answer (or was cut while reasoning) */
    const char *finish_reason; /* "stop", "length", "deadline", "cancelled", "first-finish" */
    int thinking_tokens;
    int answer_tokens;
    int forced_answer;
    double confidence;      /* weighted: lowest mean log-probability over 16 tokens; 0 otherwise */
} edgetts_row;

typedef struct edgetts_vote {
    char answer[EDGETTS_ANSWER_MAX];
    int count;
    double weight; /* count, or for weighted the summed exp(confidence) */
} edgetts_vote;

typedef struct edgetts_result {
    int has_answer;
    char answer[EDGETTS_ANSWER_MAX];
    int point_index;        /* the frontier point that ran (run_point: with its n and budget as given) */
    const char *point_id;   /* its id */
    const char *strategy;
    int n, budget;
    int predicted_miss;     /* the policy found no point that fits: this is the fastest fallback */
    int n_votes;
    edgetts_vote votes[EDGETTS_MAX_ROWS]; /* in first-seen order */
    int rows_used;
    int generated_tokens;   /* sampled tokens of all rows */
    int prompt_tokens;
    double latency_ms;
    int deadline_met;       /* -1: no deadline */
    const char *early_stop; /* NULL, "esc", "adaptive", "deadline", "first-finish", "cancelled" */
    edgetts_row *rows;      /* rows_used rows, freed by edgetts_result_free */
} edgetts_result;

#define EDGETTS_NO_DEADLINE 1e300 /* a deadline this large never binds */

/* The embedded frontier. */
int edgetts_n_points(void);
const edgetts_point_info *edgetts_point_at(int index);
const char *edgetts_config_digest(void); /* FNV-1a 64 of the config's bytes, hex */

void edgetts_options_init(edgetts_options *opts);

/* Opens every model of the frontier, sized for its largest n and budget.  On failure *out is
 * NULL and `err` (when not NULL) holds a one-line message. */
edgetts_status edgetts_open(const edgetts_options *opts, edgetts_runtime **out, char *err, size_t err_len);

/* The policy's point for the deadline and energy limit (energy_j <= 0: no limit), its run, and
 * the observed latency fed back to the policy.  deadline_ms must be > 0 (EDGETTS_NO_DEADLINE
 * for none); a deadline shorter than the fastest point (within the energy limit) needs on an idle
 * device is refused with EDGETTS_E_DEADLINE, running nothing (the caller's error, as `edgetts run
 * --config` exits 2 and `edgetts serve` answers 400); a deadline only a slowdown prevents runs the
 * fastest point and is cut at the deadline.  `seed` seeds row i with seed + i, as the Python runtime does. */
edgetts_status edgetts_answer(edgetts_runtime *rt, const char *question, double deadline_ms, double energy_j,
                              unsigned int seed, edgetts_result *res);

/* Runs frontier point `index` with n and budget overridden where > 0 (for experts); no policy,
 * no recalibration.  n may not exceed the largest n of the frontier, nor budget its largest budget;
 * a point of the one-row strategy (single) takes no n above 1 (EDGETTS_E_ARGUMENT). */
edgetts_status edgetts_run_point(edgetts_runtime *rt, int index, const char *question, int n, int budget,
                                 double deadline_ms, unsigned int seed, edgetts_result *res);

/* The policy alone: the index of the most accurate point whose latency, times the current
 * slowdown, fits (under a price, edgetts_set_price: the one that fits and maximizes accuracy minus
 * price x cost); *miss (when not NULL) says nothing fitted and this is the fastest fallback. */
int edgetts_policy_select(const edgetts_runtime *rt, double deadline_ms, double energy_j, int *miss);
/* Feeds a measured latency of a point back: the slowdown becomes the median, over the last 15 runs,
 * of measured latency over the point's profiled median latency, never below 1. */
void edgetts_policy_observe(edgetts_runtime *rt, int index, double latency_ms);
/* A price on compute, in accuracy per millisecond of predicted latency (0, the default: the most
 * accurate point that fits).  The policy then takes the point that fits and maximizes accuracy
 * minus price x predicted latency, as edgetts.runtime.Policy.select(price=...); under a mean budget
 * in joules (below), accuracy per joule, weighing each point's profiled energy_j instead.
 * EDGETTS_E_ARGUMENT for a negative, NaN or infinite price. */
edgetts_status edgetts_set_price(edgetts_runtime *rt, double price);
double edgetts_price(const edgetts_runtime *rt);

/* A mean budget per answer, which then sets the price (as `edgetts run --mean-ms B -` and
 * edgetts.runtime.pricing.MeanSpend, in the same operations): after each answer the price rises
 * while the recent mean cost (weighted over about the last 20 answers) is above `budget` and falls
 * while below, by a factor of at most e^0.5 an answer and never past ten times the price from which
 * the cheapest point is chosen; a price below 1e-5 is 0.  The price edgetts_set_price set is where
 * it starts.  EDGETTS_COST_MS: each answer costs its latency, counted by edgetts_answer itself.
 * EDGETTS_COST_J (on a battery): each answer costs the energy the device drew since the previous
 * answer, which the caller reads from its meter and reports with edgetts_spent, and the price
 * weighs each point's profiled energy_j instead of its latency (EDGETTS_E_ARGUMENT when a point has
 * none).  budget 0 stops holding one (the price stays where it is); negative, NaN or infinite:
 * EDGETTS_E_ARGUMENT.  Answers of edgetts_run_point are not counted. */
typedef enum edgetts_cost { EDGETTS_COST_MS = 0, EDGETTS_COST_J = 1 } edgetts_cost;
edgetts_status edgetts_set_mean_budget(edgetts_runtime *rt, double budget, edgetts_cost cost);
/* Counts one answer's cost (ms or J) against the mean budget; returns the price for the next answer
 * (a negative, NaN or infinite cost, or no budget: the price as it is). */
double edgetts_spent(edgetts_runtime *rt, double cost);
double edgetts_policy_slowdown(const edgetts_runtime *rt);

/* Thread-safe: stops the call running on `rt` at its next step; nothing when no call runs. */
void edgetts_cancel(edgetts_runtime *rt);

const char *edgetts_last_error(const edgetts_runtime *rt);
/* One line per engine whose settings (threads, GPU layers) differ from those its points were
 * profiled with, or "" (the runtime runs the caller's settings; the profile's latencies may then
 * be off).  Also, once, a warning that offload was asked of a build that cannot offload. */
const char *edgetts_notes(const edgetts_runtime *rt);
const char *edgetts_status_name(edgetts_status status);
void edgetts_result_free(edgetts_result *res);
void edgetts_close(edgetts_runtime *rt);

#ifdef __cplusplus
}
#endif

#endif /* EDGETTS_H */
