/* edgetts-answer: one question per line on stdin, one JSON object per line on stdout.
 *
 *   edgetts-answer [--config CONFIG] [--deadline-ms D] [--energy-j E] [--price P] [--mean-ms B]
 *                  [--seed S] [--model-dir DIR] [--threads T] [--gpu-layers auto|-1|L]
 *                  [--point ID] [--n N] [--budget B] [--rows]
 *
 * The frontier is compiled in; --config, when given, must be the file it was built from.
 * Without --deadline-ms the policy picks the most accurate point and no deadline binds.
 * --point runs one frontier point (its id or index) without the policy; --rows adds every
 * row's tokens and text.  --mean-ms holds a mean latency per answer by moving the price (which
 * --price then starts from), as `edgetts run --mean-ms B -` does; each answer says the price its
 * point was chosen under.  A question that fails prints {"error": ...} and the next line goes on;
 * a bad command line, a runtime that cannot open or no line at all on stdin exits 2 with one line
 * on stderr.
 * --threads and --gpu-layers run every engine (default: all cores but one, every layer where
 * llama.cpp can offload); where they differ from the settings the points were profiled with, a
 * note on stderr says so.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgetts.h"
#include "utf8.h"

/* A JSON string; bytes that are not UTF-8 become U+FFFD, as Python decodes them ("replace"). */
static void json_string(const char *s)
{
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)s; *p;) {
        int n = ett_utf8_length(p);
        if (n == 0) {
            fputs("\\ufffd", stdout);
            p++;
        } else if (n > 1) {
            fwrite(p, 1, (size_t)n, stdout);
            p += n;
        } else {
            if (*p == '"' || *p == '\\') {
                printf("\\%c", *p);
            } else if (*p == '\n') {
                fputs("\\n", stdout);
            } else if (*p < 0x20 || *p == 0x7f) {
                printf("\\u%04x", *p);
            } else {
                putchar(*p);
            }
            p++;
        }
    }
    putchar('"');
}

static void json_or_null(const char *s)
{
    if (s != NULL) {
        json_string(s);
    } else {
        fputs("null", stdout);
    }
}

/* price: the price on compute the policy chose the point under (negative: no policy, --point) */
static void print_result(const edgetts_result *r, int rows, double price)
{
    fputs("{\"answer\": ", stdout);
    json_or_null(r->has_answer ? r->answer : NULL);
    fputs(", \"point_id\": ", stdout);
    json_or_null(r->point_id);
    fputs(", \"strategy\": ", stdout);
    json_string(r->strategy);
    printf(", \"n\": %d, \"budget\": %d, \"latency_ms\": %.3f, \"deadline_met\": %s, \"generated_tokens\": %d",
           r->n, r->budget, r->latency_ms, r->deadline_met < 0 ? "null" : (r->deadline_met ? "true" : "false"),
           r->generated_tokens);
    printf(", \"rows_used\": %d, \"prompt_tokens\": %d, \"early_stop\": ", r->rows_used, r->prompt_tokens);
    json_or_null(r->early_stop);
    if (price >= 0) {
        printf(", \"price\": %.17g", price);
    }
    fputs(", \"votes\": {", stdout);
    for (int i = 0; i < r->n_votes; i++) {
        fputs(i ? ", " : "", stdout);
        json_string(r->votes[i].answer);
        printf(": %.17g", r->votes[i].weight);
    }
    putchar('}');
    if (rows) {
        fputs(", \"rows\": [", stdout);
        for (int i = 0; i < r->rows_used; i++) {
            const edgetts_row *w = &r->rows[i];
            fputs(i ? ", {\"tokens\": [" : "{\"tokens\": [", stdout);
            for (int k = 0; k < w->n_tokens; k++) {
                printf(k ? ", %d" : "%d", w->tokens[k]);
            }
            fputs("], \"text\": ", stdout);
            json_string(w->text);
            fputs(", \"answer\": ", stdout);
            json_or_null(w->answer);
            fputs(", \"finish_reason\": ", stdout);
            json_or_null(w->finish_reason);
            printf(", \"thinking_tokens\": %d, \"answer_tokens\": %d, \"forced_answer\": %s", w->thinking_tokens,
                   w->answer_tokens, w->forced_answer ? "true" : "false");
            if (isfinite(w->confidence)) {
                printf(", \"confidence\": %.17g}", w->confidence);
            } else {
                fputs(", \"confidence\": null}", stdout);
            }
        }
        putchar(']');
    }
    puts("}");
}

static const char USAGE[] = "usage: edgetts-answer [--config CONFIG] [--deadline-ms D] [--energy-j E] [--price P]"
                            " [--mean-ms B] [--seed S] [--model-dir DIR] [--threads T] [--gpu-layers L]"
                            " [--point ID] [--n N] [--budget B] [--rows]";

static const char HELP[] =
    "Reads one question per line on stdin; prints one JSON object per line (the answer, the point that\n"
    "ran, its votes, latency and whether the deadline was met), or {\"error\": ...} for that line.\n"
    "  --config CONFIG   the config this program was built from (checked: the same bytes)\n"
    "  --deadline-ms D   each answer's deadline (default none: the most accurate point, no deadline)\n"
    "  --energy-j E      the most energy an answer may take, in joules (points without a figure excluded)\n"
    "  --price P         a price on compute: accuracy per ms of predicted latency (default 0)\n"
    "  --mean-ms B       hold a mean latency per answer by moving the price (from --price)\n"
    "  --seed S          row i is seeded S + i (0 to 4294967295; default 0)\n"
    "  --model-dir DIR   the folder holding the models' files on this machine\n"
    "  --threads T       threads of every engine (default: every core but one)\n"
    "  --gpu-layers L    auto (default: every layer where llama.cpp can offload), -1 (all) or a count\n"
    "  --point ID        run one frontier point (its id or index) without the policy;\n"
    "                    --n N and --budget B override its rows and thinking budget\n"
    "  --rows            add every row's tokens and text\n";

static int usage(const char *msg)
{
    fprintf(stderr, "error: %s\n%s\n", msg, USAGE);
    return 2;
}

static int number(const char *s, double *out)
{
    char *end;
    *out = strtod(s, &end);
    return *s != '\0' && *end == '\0';
}

int main(int argc, char **argv)
{
    edgetts_options opts;
    double deadline = EDGETTS_NO_DEADLINE, energy = 0, price = 0, mean_ms = 0, v;
    int point = -1, n = 0, budget = 0, rows = 0;
    unsigned seed = 0;
    char err[1024];
    edgetts_options_init(&opts);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--rows") == 0) {
            rows = 1;
            continue;
        }
        if (strcmp(a, "--help") == 0) {
            printf("%s\n%s", USAGE, HELP);
            return 0;
        }
        static const char *const known[] = {"--config", "--model-dir", "--point", "--gpu-layers", "--deadline-ms",
                                             "--energy-j", "--price", "--mean-ms", "--seed", "--threads", "--n",
                                             "--budget"};
        int is_known = 0;
        for (size_t k = 0; k < sizeof known / sizeof *known; k++) {
            is_known |= strcmp(a, known[k]) == 0;
        }
        if (!is_known || i + 1 >= argc) {
            char why[256];
            snprintf(why, sizeof why, is_known ? "%s needs a value" : "unknown option %s", a);
            return usage(why);
        }
        const char *val = argv[++i];
        if (strcmp(a, "--config") == 0) {
            opts.config_path = val;
        } else if (strcmp(a, "--model-dir") == 0) {
            opts.model_dir = val;
        } else if (strcmp(a, "--point") == 0) {
            point = -2;
            for (int k = 0; k < edgetts_n_points(); k++) {
                if (strcmp(edgetts_point_at(k)->id, val) == 0) {
                    point = k;
                }
            }
            if (point == -2 && number(val, &v) && v >= 0 && v < edgetts_n_points() && v == (int)v) {
                point = (int)v;
            }
            if (point == -2) {
                fprintf(stderr, "error: no frontier point %s\n", val);
                return 2;
            }
        } else if (strcmp(a, "--gpu-layers") == 0 && strcmp(val, "auto") == 0) {
            opts.gpu_layers = EDGETTS_GPU_LAYERS_AUTO;
        } else if (!number(val, &v)) {
            fprintf(stderr, "error: %s needs a number, got %s\n", a, val);
            return 2;
        } else if (strcmp(a, "--deadline-ms") == 0) {
            if (!(v > 0)) {
                fprintf(stderr, "error: --deadline-ms must be positive, got %s\n", val);
                return 2;
            }
            deadline = v;
        } else if (strcmp(a, "--energy-j") == 0) {
            if (!(v > 0) || isinf(v)) {
                fprintf(stderr, "error: --energy-j must be a positive number of joules, got %s\n", val);
                return 2;
            }
            energy = v;
        } else if (strcmp(a, "--price") == 0) {
            if (!(v >= 0) || isinf(v)) {
                fprintf(stderr, "error: --price must be a finite number >= 0, got %s\n", val);
                return 2;
            }
            price = v;
        } else if (strcmp(a, "--mean-ms") == 0) {
            if (!(v > 0) || isinf(v)) {
                fprintf(stderr, "error: --mean-ms must be a positive number of milliseconds, got %s\n", val);
                return 2;
            }
            mean_ms = v;
        } else if (strcmp(a, "--seed") == 0) {
            if (!(v >= 0 && v <= 4294967295.0) || v != floor(v)) {
                fprintf(stderr, "error: --seed must be a whole number from 0 to 4294967295, got %s\n", val);
                return 2;
            }
            seed = (unsigned)v;
        } else if (strcmp(a, "--threads") == 0) {
            /* a whole number that fits an int; edgetts_open() refuses more threads than llama.cpp can run */
            if (!(v >= 1 && v <= 1000000) || v != (int)v) {
                fprintf(stderr, "error: --threads must be a whole number of at least 1, got %s\n", val);
                return 2;
            }
            opts.threads = (int)v;
        } else if (strcmp(a, "--gpu-layers") == 0) {
            if (!(v >= -1 && v <= 100000) || v != (int)v) {
                fprintf(stderr, "error: --gpu-layers must be auto, -1 (all) or a number of layers, got %s\n", val);
                return 2;
            }
            opts.gpu_layers = (int)v;
        } else if (strcmp(a, "--n") == 0 || strcmp(a, "--budget") == 0) {
            /* range-checked before the cast: a double beyond int is undefined behaviour in C */
            if (!(v >= 1 && v <= 1000000) || v != (int)v) {
                fprintf(stderr, "error: %s must be a whole number from 1 to 1000000, got %s\n", a, val);
                return 2;
            }
            *(strcmp(a, "--n") == 0 ? &n : &budget) = (int)v;
        } else {
            fprintf(stderr, "error: unknown option %s (or bad value %s)\n", a, val);
            return 2;
        }
    }
    if (mean_ms > 0 && point >= 0) {
        return usage("--mean-ms holds a budget by choosing points; --point runs one (give one of them)");
    }
    edgetts_runtime *rt = NULL;
    edgetts_status st = edgetts_open(&opts, &rt, err, sizeof err);
    if (st != EDGETTS_OK) {
        fprintf(stderr, "error: %s\n", err);
        return 2;
    }
    fputs(edgetts_notes(rt), stderr);
    edgetts_set_price(rt, price);
    edgetts_set_mean_budget(rt, mean_ms, EDGETTS_COST_MS); /* checked above: cannot fail */
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    long asked = 0;
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        asked++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) {
            line[--len] = '\0';
        }
        if (strlen(line) != (size_t)len) { /* a C string ends at a NUL: the rest would go unread, unsaid */
            printf("{\"error\": \"the question holds a NUL character\", \"status\": \"%s\"}\n",
                   edgetts_status_name(EDGETTS_E_ARGUMENT));
            fflush(stdout);
            continue;
        }
        edgetts_result res;
        double priced = point >= 0 ? -1.0 : edgetts_price(rt); /* before the answer moves it */
        if (point >= 0) {
            st = edgetts_run_point(rt, point, line, n, budget, deadline, seed, &res);
        } else {
            st = edgetts_answer(rt, line, deadline, energy, seed, &res);
        }
        if (st == EDGETTS_OK) {
            print_result(&res, rows, priced);
        } else {
            fputs("{\"error\": ", stdout);
            json_string(edgetts_last_error(rt));
            printf(", \"status\": \"%s\"}\n", edgetts_status_name(st));
        }
        fflush(stdout);
        edgetts_result_free(&res);
    }
    free(line);
    edgetts_close(rt);
    if (asked == 0) { /* an empty file, or standard input closed: say so, as edgetts run - does */
        fputs("error: no question on standard input (one per line)\n", stderr);
        return 2;
    }
    return 0;
}
