/* Well-formed UTF-8, shared by the library (questions must be text, as in Python) and edgetts-answer
 * (its JSON output); not installed. */
#ifndef EDGETTS_UTF8_H
#define EDGETTS_UTF8_H

/* Bytes of the well-formed UTF-8 sequence at p (1..4), or 0 where it is not one (a row's text is the
 * bytes of its token pieces, and a piece may end in the middle of a character). */
static inline int ett_utf8_length(const unsigned char *p)
{
    int n = p[0] < 0x80 ? 1 : p[0] >= 0xc2 && p[0] <= 0xdf ? 2 : p[0] >= 0xe0 && p[0] <= 0xef ? 3
            : p[0] >= 0xf0 && p[0] <= 0xf4 ? 4 : 0;
    for (int k = 1; k < n; k++) {
        if ((p[k] & 0xc0) != 0x80) {
            return 0; /* also where the string ends inside the sequence: its NUL is not a continuation */
        }
    }
    if ((n == 3 && p[0] == 0xe0 && p[1] < 0xa0) || (n == 3 && p[0] == 0xed && p[1] > 0x9f)
        || (n == 4 && p[0] == 0xf0 && p[1] < 0x90) || (n == 4 && p[0] == 0xf4 && p[1] > 0x8f)) {
        return 0; /* overlong, a surrogate, or past U+10FFFF */
    }
    return n;
}

/* Whether the NUL-terminated s is well-formed UTF-8 throughout. */
static inline int ett_utf8_valid(const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p;) {
        int n = ett_utf8_length(p);
        if (n == 0) {
            return 0;
        }
        p += n;
    }
    return 1;
}

#endif
