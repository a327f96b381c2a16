/* Answer extraction, equal to edgetts.tasks.grading.extract_answer on ASCII text.
 *
 * The reasoning block is removed first (the text after the last end-of-thinking delimiter;
 * when only the opening delimiter is there, the text before it).  The answer is then the
 * first of these that matches, each at its last occurrence: "#### x" (the rest of the line),
 * "\boxed{x}" or "\fbox{x}" (balanced braces), "answer is x" / "answer: x" (case-insensitive;
 * the number that starts x, else the rest of the line up to a "$"), and the last number.
 * Numbers are Python's pattern -?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+.  The answer is stripped
 * of whitespace and trailing dots and cut at 200 characters.
 *
 * Narrower than Python: digits and whitespace are ASCII only (Python's regular expressions
 * also take other Unicode digits and spaces), case-insensitivity is ASCII only, and invalid
 * UTF-8 stays as bytes where Python decodes it to U+FFFD.  Votes compare answers as strings;
 * Python's math-verify equivalence is for grading, not voting, and has no C counterpart.
 */
#include <string.h>

#include "internal.h"

#define MAX_ANSWER_CHARS 200

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static int is_space(char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

static char lower(char c)
{
    return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
}

/* Length of the number pattern matched at s[0] (0: none), given `end`. */
static size_t number_at(const char *s, const char *end)
{
    const char *p = s;
    if (p < end && *p == '-' && p + 1 < end && is_digit(p[1])) {
        p++;
    }
    if (p < end && is_digit(*p)) {
        p++;
        while (p < end && (is_digit(*p) || *p == ',')) {
            p++;
        }
        if (p + 1 < end && *p == '.' && is_digit(p[1])) {
            p += 2;
            while (p < end && is_digit(*p)) {
                p++;
            }
        }
        if (p + 1 < end && *p == '/' && is_digit(p[1])) {
            p += 2;
            while (p < end && is_digit(*p)) {
                p++;
            }
        }
        return (size_t)(p - s);
    }
    p = s;
    if (p < end && *p == '-') {
        p++;
    }
    if (p + 1 < end && *p == '.' && is_digit(p[1])) {
        p += 2;
        while (p < end && is_digit(*p)) {
            p++;
        }
        return (size_t)(p - s);
    }
    return 0;
}

/* _clean: strip, drop trailing dots, strip, keep 200 characters (UTF-8 code points). */
static int clean(const char *s, const char *e, char *out, size_t cap)
{
    while (s < e && is_space(*s)) {
        s++;
    }
    while (e > s && is_space(e[-1])) {
        e--;
    }
    while (e > s && e[-1] == '.') {
        e--;
    }
    while (e > s && is_space(e[-1])) {
        e--;
    }
    size_t n = 0, chars = 0;
    while (s + n < e) {
        if (((unsigned char)s[n] & 0xC0) != 0x80 && chars++ == MAX_ANSWER_CHARS) {
            break;
        }
        n++;
    }
    if (n >= cap) {
        n = cap - 1;
        while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80) { /* do not split a character */
            n--;
        }
    }
    memcpy(out, s, n);
    out[n] = '\0';
    return 1;
}

static const char *find_last(const char *s, const char *e, const char *needle)
{
    size_t k = strlen(needle);
    const char *found = NULL;
    for (const char *p = s; p + k <= e; p++) {
        if (memcmp(p, needle, k) == 0) {
            found = p;
        }
    }
    return found;
}

static const char *find_first(const char *s, const char *e, const char *needle)
{
    size_t k = strlen(needle);
    for (const char *p = s; p + k <= e; p++) {
        if (memcmp(p, needle, k) == 0) {
            return p;
        }
    }
    return NULL;
}

/* "####\s*([^\n]+)" at p: the group's bounds, with the backtracking of \s* that Python does. */
static int hashes_at(const char *p, const char *e, const char **g0, const char **g1)
{
    if (e - p < 4 || memcmp(p, "####", 4) != 0) {
        return 0;
    }
    const char *w = p + 4, *ws = w;
    while (w < e && is_space(*w)) {
        w++;
    }
    for (const char *q = w; q >= ws; q--) {
        if (q < e && *q != '\n') {
            const char *r = q;
            while (r < e && *r != '\n') {
                r++;
            }
            *g0 = q;
            *g1 = r;
            return 1;
        }
    }
    return 0;
}

/* "answer\s*(?:is|:)\s*:?\s*\$?\s*" (case-insensitive) at p: the match end, or NULL. */
static const char *answer_is_at(const char *p, const char *e)
{
    static const char word[] = "answer";
    for (int i = 0; i < 6; i++) {
        if (p + i >= e || lower(p[i]) != word[i]) {
            return NULL;
        }
    }
    p += 6;
    while (p < e && is_space(*p)) {
        p++;
    }
    if (p + 1 < e && lower(p[0]) == 'i' && lower(p[1]) == 's') {
        p += 2;
    } else if (p < e && *p == ':') {
        p++;
    } else {
        return NULL;
    }
    while (p < e && is_space(*p)) {
        p++;
    }
    if (p < e && *p == ':') {
        p++;
    }
    while (p < e && is_space(*p)) {
        p++;
    }
    if (p < e && *p == '$') {
        p++;
    }
    while (p < e && is_space(*p)) {
        p++;
    }
    return p;
}

int ett_extract_answer(const char *text, const char *think_start, const char *think_end, char *out, size_t cap)
{
    const char *s = text, *e = text + strlen(text), *hit;
    out[0] = '\0';
    if (think_end && *think_end && (hit = find_last(s, e, think_end)) != NULL) {
        s = hit + strlen(think_end);
    } else if (think_start && *think_start && (hit = find_first(s, e, think_start)) != NULL) {
        e = hit;
    }
    /* #### x: findall, the last match */
    const char *g0 = NULL, *g1 = NULL;
    for (const char *p = s; p < e;) {
        const char *a, *b;
        if (hashes_at(p, e, &a, &b)) {
            g0 = a;
            g1 = b;
            p = b;
        } else {
            p++;
        }
    }
    if (g0 != NULL) {
        return clean(g0, g1, out, cap);
    }
    /* \boxed{x} or \fbox{x}: the last one */
    const char *bx = find_last(s, e, "\\boxed{"), *fb = find_last(s, e, "\\fbox{");
    const char *start = (bx == NULL || (fb != NULL && fb > bx)) ? fb : bx;
    if (start != NULL) {
        const char *i = strchr(start, '{') + 1, *j = i;
        int depth = 1;
        while (j < e && depth) {
            depth += *j == '{' ? 1 : (*j == '}' ? -1 : 0);
            j++;
        }
        const char *c0 = i, *c1 = depth == 0 ? j - 1 : e;
        while (c0 < c1 && is_space(*c0)) {
            c0++;
        }
        while (c1 > c0 && is_space(c1[-1])) {
            c1--;
        }
        if (c1 > c0) {
            return clean(c0, c1, out, cap);
        }
    }
    /* the answer is x: the last match */
    const char *said = NULL;
    for (const char *p = s; p < e;) {
        const char *m = answer_is_at(p, e);
        if (m != NULL) {
            said = m;
            p = m > p ? m : p + 1;
        } else {
            p++;
        }
    }
    if (said != NULL) {
        const char *r1 = said;
        while (r1 < e && *r1 != '\n' && *r1 != '$') {
            r1++;
        }
        size_t k = number_at(said, r1);
        if (k > 0) {
            return clean(said, said + k, out, cap);
        }
        for (const char *q = said; q < r1; q++) {
            if (!is_space(*q)) {
                return clean(said, r1, out, cap);
            }
        }
    }
    /* the last number */
    const char *n0 = NULL;
    size_t nk = 0;
    for (const char *p = s; p < e;) {
        size_t k = number_at(p, e);
        if (k > 0) {
            n0 = p;
            nk = k;
            p += k;
        } else {
            p++;
        }
    }
    if (n0 != NULL) {
        return clean(n0, n0 + nk, out, cap);
    }
    return 0;
}
