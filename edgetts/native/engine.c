/* The engine primitive over llama.cpp's C API: N continuations of one prompt in one batch.
 *
 * The same loop as edgetts/engines/llamacpp.py, step for step, so that with the same seeds
 * the rows are the same tokens:
 *
 * 1. the prompt (with BOS when the vocabulary asks for it) is decoded once into sequence 0
 *    in chunks of n_ubatch tokens, with logits only for its last token;
 * 2. llama_memory_seq_cp shares those cells with sequences 1..n-1;
 * 3. each row owns a sampler chain (top-k, top-p, min-p, temperature, a seeded draw; greedy
 *    at temperature 0) and samples from its own output slot of the last batch;
 * 4. each step samples every live row in row order, calls the controller (which may stop
 *    rows or force text into them), then puts every live row's pending tokens (sampled and
 *    forced) into one batch in row order and calls llama_decode once; finished rows drop
 *    their cells with llama_memory_seq_rm.
 *
 * The context is sized like edgetts.engines.spec.ContextPlan, and its parameters (n_batch,
 * n_ubatch, n_seq_max, kv_unified, flash attention) are the Python engine's: floating point
 * results depend on them.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

static void quiet_log(enum ggml_log_level level, const char *text, void *user)
{
    (void)user;
    /* llama.cpp logs every tensor it loads; only errors (and their continuation lines) matter here. */
    static int last = 0;
    if (level != GGML_LOG_LEVEL_CONT) {
        last = level;
    }
    if (getenv("EDGETTS_VERBOSE") != NULL || last == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

void ett_quiet_log(void)
{
    llama_log_set(quiet_log, NULL);
}

static int is_gguf(const char *path, char *err, size_t err_len)
{
    char magic[4];
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        snprintf(err, err_len, "%s: no such file", path);
        return 0;
    }
    size_t got = fread(magic, 1, 4, f);
    fclose(f);
    if (got != 4 || memcmp(magic, "GGUF", 4) != 0) {
        snprintf(err, err_len, "%s: not a GGUF file (bad magic bytes)", path);
        return 0;
    }
    return 1;
}

edgetts_status ett_engine_open(ett_engine *e, const char *path, int max_rows, int max_tokens, int threads,
                               int gpu_layers, int n_ctx_opt, int n_batch_opt, int flash_attn, char *err,
                               size_t err_len)
{
    memset(e, 0, sizeof *e);
    if (!is_gguf(path, err, err_len)) {
        return EDGETTS_E_MODEL;
    }
    /* llama.cpp sizes its batch and reserved outputs from n_ctx before rounding it up to 256: below the
     * sequences it holds it aborts on the first decode (the Python engine refuses the same) */
    int least = 2 * max_rows > 256 ? 2 * max_rows : 256;
    if (n_ctx_opt > 0 && n_ctx_opt < least) {
        snprintf(err, err_len, "n_ctx must be at least %d for %d row(s), got %d", least, max_rows, n_ctx_opt);
        return EDGETTS_E_CONTEXT;
    }
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = gpu_layers;
    e->model = llama_model_load_from_file(path, mp);
    if (e->model == NULL) {
        snprintf(err, err_len, "%s: llama.cpp could not load this model (unsupported or corrupt GGUF)", path);
        return EDGETTS_E_MODEL;
    }
    int per_row = max_tokens + ETT_FORCED_SLACK;
    int planned = 64 * ((ETT_PROMPT_RESERVE + max_rows * per_row + 63) / 64);
    int n_batch = n_batch_opt > 0 ? n_batch_opt : 512;
    struct llama_context_params cp = llama_context_default_params();
    /* A step may carry forced text for every row at once: the logical batch is sized for that. */
    e->batch_cap = n_batch > max_rows * 64 ? n_batch : max_rows * 64;
    cp.n_ctx = (uint32_t)(n_ctx_opt > 0 ? n_ctx_opt : planned);
    cp.n_batch = (uint32_t)e->batch_cap;
    cp.n_ubatch = (uint32_t)n_batch;
    cp.n_seq_max = (uint32_t)(2 * max_rows); /* rows, then the Python engine's probe sequences */
    cp.n_threads = cp.n_threads_batch = threads; /* >= 1: the runtime resolves the default (runtime.c) */
    cp.kv_unified = true;
    cp.flash_attn_type = (enum llama_flash_attn_type)flash_attn;
    cp.no_perf = true;
    e->ctx = llama_init_from_model(e->model, cp);
    if (e->ctx == NULL) {
        snprintf(err, err_len, "%s: could not create a context of %u tokens (out of memory?)", path, cp.n_ctx);
        llama_model_free(e->model);
        e->model = NULL;
        return EDGETTS_E_CONTEXT;
    }
    e->n_ctx = (int)llama_n_ctx(e->ctx);
    e->n_batch = n_batch;
    e->max_rows = max_rows;
    e->vocab = llama_model_get_vocab(e->model);
    e->add_bos = llama_vocab_get_add_bos(e->vocab) ? 1 : 0;
    e->mem = llama_get_memory(e->ctx);
    e->batch = llama_batch_init(e->batch_cap, 0, 1);
    /* One decode now, so the first request does not pay for buffer allocation (as in Python). */
    e->batch.token[0] = llama_vocab_bos(e->vocab);
    e->batch.pos[0] = 0;
    e->batch.n_seq_id[0] = 1;
    e->batch.seq_id[0][0] = 0;
    e->batch.logits[0] = 1;
    e->batch.n_tokens = 1;
    llama_decode(e->ctx, e->batch);
    llama_memory_clear(e->mem, true);
    return EDGETTS_OK;
}

void ett_engine_close(ett_engine *e)
{
    if (e->ctx != NULL) {
        llama_batch_free(e->batch);
        llama_free(e->ctx);
        llama_model_free(e->model);
    }
    memset(e, 0, sizeof *e);
}

int ett_tokenize(const ett_engine *e, const char *text, int add_bos, int **out)
{
    int len = (int)strlen(text);
    int cap = len + 8;
    *out = malloc(sizeof(int) * (size_t)cap);
    if (*out == NULL) {
        return -1;
    }
    int n = llama_tokenize(e->vocab, text, len, *out, cap, add_bos != 0, true);
    if (n < 0) {
        cap = -n;
        int *grown = realloc(*out, sizeof(int) * (size_t)cap);
        if (grown == NULL) {
            free(*out);
            *out = NULL;
            return -1;
        }
        *out = grown;
        n = llama_tokenize(e->vocab, text, len, *out, cap, add_bos != 0, true);
    }
    return n;
}

static struct llama_sampler *make_sampler(const ett_sampling *sp, unsigned seed)
{
    struct llama_sampler *chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (sp->temperature == 0.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_greedy());
        return chain;
    }
    if (sp->top_k > 0) {
        llama_sampler_chain_add(chain, llama_sampler_init_top_k(sp->top_k));
    }
    if (sp->top_p < 1.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_top_p(sp->top_p, 1));
    }
    if (sp->min_p > 0.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_min_p(sp->min_p, 1));
    }
    llama_sampler_chain_add(chain, llama_sampler_init_temp(sp->temperature));
    /* LLAMA_DEFAULT_SEED asks llama.cpp for a random seed: a row's tokens must follow from its seed, so that
     * one value becomes 0 (edgetts.engines.base.draw_seed, the same mapping) */
    llama_sampler_chain_add(chain, llama_sampler_init_dist(seed == LLAMA_DEFAULT_SEED ? 0u : seed));
    return chain;
}

static int row_add(const ett_engine *e, ett_row *r, int tok, int forced)
{
    char buf[256], *piece = buf;
    if (r->n_tokens == r->cap) {
        int cap = r->cap ? 2 * r->cap : 64;
        int *t = realloc(r->tokens, sizeof(int) * (size_t)cap);
        if (t == NULL) {
            return 0;
        }
        r->tokens = t;
        unsigned char *f = realloc(r->forced, (size_t)cap);
        if (f == NULL) {
            return 0;
        }
        r->forced = f;
        r->cap = cap;
    }
    r->tokens[r->n_tokens] = tok;
    r->forced[r->n_tokens] = (unsigned char)(forced != 0);
    r->n_tokens++;
    r->n_generated += !forced;
    int n = llama_token_to_piece(e->vocab, tok, buf, (int)sizeof buf, 0, false);
    if (n < 0) { /* a longer piece: -n is its length */
        piece = malloc((size_t)-n);
        if (piece == NULL) {
            return 0;
        }
        n = llama_token_to_piece(e->vocab, tok, piece, -n, 0, false);
        n = n > 0 ? n : 0;
    }
    if (r->text_len + (size_t)n + 1 > r->text_cap) {
        size_t cap = 2 * (r->text_len + (size_t)n + 1) + 64;
        char *t = realloc(r->text, cap);
        if (t == NULL) {
            if (piece != buf) {
                free(piece);
            }
            return 0;
        }
        r->text = t;
        r->text_cap = cap;
    }
    memcpy(r->text + r->text_len, piece, (size_t)n);
    r->text_len += (size_t)n;
    r->text[r->text_len] = '\0';
    if (piece != buf) {
        free(piece);
    }
    return 1;
}

void ett_rows_free(ett_row *rows, int n)
{
    if (rows == NULL) {
        return;
    }
    for (int i = 0; i < n; i++) {
        free(rows[i].tokens);
        free(rows[i].forced);
        free(rows[i].text);
        free(rows[i].logprobs);
    }
    free(rows);
}

void ett_stop(ett_ctl *ctl, int row, const char *reason)
{
    ett_row *r = &ctl->rows[row];
    if (!r->finished) {
        r->finished = 1;
        r->finish_reason = reason;
    }
    free(ctl->pending[row]);
    ctl->pending[row] = NULL;
    ctl->extra[row] = 0;
}

int ett_force(ett_ctl *ctl, int row, const char *text, int extra_tokens)
{
    size_t old = ctl->pending[row] ? strlen(ctl->pending[row]) : 0;
    char *p = realloc(ctl->pending[row], old + strlen(text) + 1);
    if (p == NULL) {
        return 0;
    }
    memcpy(p + old, text, strlen(text) + 1);
    ctl->pending[row] = p;
    ctl->extra[row] += extra_tokens;
    return 1;
}

/* log p(token) from the logits at slot idx, computed as the Python engine does: float32 logits,
 * float32 differences to the maximum, exponentials summed in double. */
static int add_logprob(const ett_engine *e, ett_row *r, int idx, int tok)
{
    const float *logits = llama_get_logits_ith(e->ctx, idx);
    int n_vocab = llama_vocab_n_tokens(e->vocab);
    float m = logits[0];
    double sum = 0.0;
    for (int v = 1; v < n_vocab; v++) {
        m = logits[v] > m ? logits[v] : m;
    }
    for (int v = 0; v < n_vocab; v++) {
        sum += (double)expf(logits[v] - m);
    }
    if (r->n_logprobs == r->lp_cap) {
        int cap = r->lp_cap ? 2 * r->lp_cap : 64;
        double *grown = realloc(r->logprobs, sizeof(double) * (size_t)cap);
        if (grown == NULL) {
            return 0;
        }
        r->logprobs = grown;
        r->lp_cap = cap;
    }
    r->logprobs[r->n_logprobs++] = (double)logits[tok] - ((double)m + log(sum));
    return 1;
}

typedef struct loop_state {
    ett_row *rows;
    struct llama_sampler **samplers;
    int *in_kv, *out_idx, *limit, *stepped;
    int *n_pending; /* the row's last n_pending tokens are not decoded yet (one a step, more when forced) */
    char **pending_text;
    int *extra;
} loop_state;

static void loop_free(loop_state *s, int n)
{
    for (int i = 0; i < n; i++) {
        if (s->samplers && s->samplers[i]) {
            llama_sampler_free(s->samplers[i]);
        }
        if (s->pending_text) {
            free(s->pending_text[i]);
        }
    }
    free(s->samplers);
    free(s->in_kv);
    free(s->out_idx);
    free(s->limit);
    free(s->stepped);
    free(s->n_pending);
    free(s->pending_text);
    free(s->extra);
}

static void put(struct llama_batch *b, int i, int tok, int pos, int seq, int out)
{
    b->token[i] = tok;
    b->pos[i] = pos;
    b->n_seq_id[i] = 1;
    b->seq_id[i][0] = seq;
    b->logits[i] = (int8_t)out;
}

edgetts_status ett_sample(ett_engine *e, const char *prompt, int n, const ett_sampling *sp, const unsigned *seeds,
                          ett_controller ctl_fn, void *ctl_self, ett_row **rows_out, int *prompt_tokens,
                          char *err, size_t err_len)
{
    edgetts_status st = EDGETTS_OK;
    loop_state s;
    int *ptoks = NULL;
    memset(&s, 0, sizeof s);
    *rows_out = NULL;
    if (n < 1 || n > e->max_rows) {
        snprintf(err, err_len, "n must be between 1 and %d (the runtime's largest n), got %d", e->max_rows, n);
        return EDGETTS_E_ARGUMENT;
    }
    int np = ett_tokenize(e, prompt, e->add_bos, &ptoks);
    if (np < 0) {
        snprintf(err, err_len, "out of memory");
        return EDGETTS_E_MEMORY;
    }
    *prompt_tokens = np;
    if (np == 0) {
        free(ptoks);
        snprintf(err, err_len, "the prompt is empty");
        return EDGETTS_E_ARGUMENT;
    }
    if ((long)np + (long)n * sp->max_tokens > e->n_ctx) {
        snprintf(err, err_len, "the question is too long: prompt (%d tokens) plus %d rows x %d tokens exceeds the "
                 "context of %d", np, n, sp->max_tokens, e->n_ctx);
        free(ptoks);
        return EDGETTS_E_TOO_LONG;
    }
    s.rows = calloc((size_t)n, sizeof *s.rows);
    s.samplers = calloc((size_t)n, sizeof *s.samplers);
    s.in_kv = calloc((size_t)n, sizeof(int));
    s.out_idx = calloc((size_t)n, sizeof(int));
    s.limit = calloc((size_t)n, sizeof(int));
    s.stepped = calloc((size_t)n, sizeof(int));
    s.n_pending = calloc((size_t)n, sizeof(int));
    s.pending_text = calloc((size_t)n, sizeof(char *));
    s.extra = calloc((size_t)n, sizeof(int));
    if (!s.rows || !s.samplers || !s.in_kv || !s.out_idx || !s.limit || !s.stepped || !s.n_pending
        || !s.pending_text || !s.extra) {
        st = EDGETTS_E_MEMORY;
        goto oom;
    }
    llama_memory_clear(e->mem, true);
    double prefill_began = ett_now();
    for (int start = 0; start < np; start += e->n_batch) {
        int len = np - start < e->n_batch ? np - start : e->n_batch;
        int last = start + len == np;
        for (int j = 0; j < len; j++) {
            put(&e->batch, j, ptoks[start + j], start + j, 0, last && j == len - 1);
        }
        e->batch.n_tokens = len;
        int status = llama_decode(e->ctx, e->batch);
        ett_decoded();
        if (status != 0) {
            snprintf(err, err_len, "llama_decode failed on the prompt (%d tokens)", np);
            st = EDGETTS_E_DECODE;
            goto done;
        }
    }
    for (int i = 1; i < n; i++) {
        llama_memory_seq_cp(e->mem, 0, i, -1, -1);
    }
    for (int i = 0; i < n; i++) {
        s.samplers[i] = make_sampler(sp, seeds[i]);
        s.in_kv[i] = np;
        s.out_idx[i] = -1;
        s.limit[i] = sp->max_tokens;
    }
    ett_ctl ctl = {s.rows, n, s.pending_text, s.extra, ett_now() - prefill_began};
    for (;;) {
        int n_stepped = 0;
        for (int i = 0; i < n; i++) {
            ett_row *r = &s.rows[i];
            if (r->finished) {
                continue;
            }
            int tok = llama_sampler_sample(s.samplers[i], e->ctx, s.out_idx[i]);
            s.stepped[n_stepped++] = i;
            if (sp->logprobs && !add_logprob(e, r, s.out_idx[i], tok)) {
                goto oom;
            }
            if (llama_vocab_is_eog(e->vocab, tok)) {
                r->finished = 1;
                r->finish_reason = "stop";
                continue;
            }
            if (!row_add(e, r, tok, 0)) {
                goto oom;
            }
            s.n_pending[i]++;
        }
        if (ctl_fn != NULL) {
            ctl_fn(ctl_self, &ctl, s.stepped, n_stepped);
            for (int i = 0; i < n; i++) {
                if (s.pending_text[i] == NULL) {
                    continue;
                }
                int *ft = NULL;
                int nf = ett_tokenize(e, s.pending_text[i], 0, &ft);
                if (nf < 0) {
                    goto oom;
                }
                for (int k = 0; k < nf; k++) {
                    if (!row_add(e, &s.rows[i], ft[k], 1)) {
                        free(ft);
                        goto oom;
                    }
                    s.n_pending[i]++;
                }
                free(ft);
                s.limit[i] += s.extra[i];
                free(s.pending_text[i]);
                s.pending_text[i] = NULL;
                s.extra[i] = 0;
            }
        }
        for (int k = 0; k < n_stepped; k++) {
            ett_row *r = &s.rows[s.stepped[k]];
            if (!r->finished && r->n_generated >= s.limit[s.stepped[k]]) {
                r->finished = 1;
                r->finish_reason = "length";
            }
        }
        int n_entries = 0, n_live = 0;
        for (int i = 0; i < n; i++) {
            ett_row *r = &s.rows[i];
            if (r->finished) {
                continue;
            }
            int len = s.n_pending[i];
            if (s.in_kv[i] + len >= e->n_ctx || n_entries + len > e->batch_cap) {
                r->finished = 1;
                r->finish_reason = "length";
                continue;
            }
            const int *toks = r->tokens + r->n_tokens - len;
            for (int j = 0; j < len; j++) {
                put(&e->batch, n_entries++, toks[j], s.in_kv[i] + j, i, j == len - 1);
            }
            s.out_idx[i] = n_entries - 1;
            s.in_kv[i] += len;
            s.n_pending[i] = 0;
            n_live++;
        }
        for (int i = 0; i < n; i++) {
            if (s.rows[i].finished && s.in_kv[i] >= 0) {
                llama_memory_seq_rm(e->mem, i, -1, -1);
                s.in_kv[i] = -1;
            }
        }
        if (n_live == 0) {
            break;
        }
        e->batch.n_tokens = n_entries;
        int status = llama_decode(e->ctx, e->batch);
        ett_decoded();
        if (status != 0) { /* no free cell: treat as running out of context */
            for (int i = 0; i < n; i++) {
                if (!s.rows[i].finished) {
                    ett_stop(&ctl, i, "length");
                }
            }
            break;
        }
    }
    goto done;
oom:
    snprintf(err, err_len, "out of memory");
    st = EDGETTS_E_MEMORY;
done:
    free(ptoks);
    if (st == EDGETTS_OK) {
        *rows_out = s.rows;
        s.rows = NULL;
    } else if (s.rows != NULL) {
        ett_rows_free(s.rows, n);
        s.rows = NULL;
    }
    loop_free(&s, n);
    return st;
}
