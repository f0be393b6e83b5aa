#include <ctype.h>
#include <limits.h>
#include <string.h>

/* Reverse a NUL-terminated string. */
void reverse_string(char *s)
{
    size_t length = strlen(s);
    if (length < 2)
        return;
    char *left = s;
    char *right = s + length - 1;
    while (left < right) {
        char held = *left;
        *left = *right;
        *right = held;
        left++;
        right--;
    }
}

/* Count the words in s: runs of characters separated by whitespace. */
int count_words(const char *s)
{
    int words = 0;
    int inside = 0;
    for (; *s != '\0'; s++) {
        if (isspace((unsigned char)*s)) {
            inside = 0;
        } else if (!inside) {
            inside = 1;
            words++;
        }
    }
    return words;
}

/* Trim s where it lies; returns where the trimmed text starts. */
char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    if (*s == '\0')
        return s;
    char *end = s + strlen(s) - 1;
    while (end > s && isspace((unsigned char)*end))
        end--;
    end[1] = '\0';
    return s;
}

/* Parse a decimal integer; returns 0 on success, -1 if s is not a number or does not fit in an int. */
int parse_int(const char *s, int *out)
{
    int negative = 0;
    long long value = 0;
    if (*s == '-' || *s == '+') {
        negative = (*s == '-');
        s++;
    }
    if (!isdigit((unsigned char)*s))
        return -1;
    for (; isdigit((unsigned char)*s); s++) {
        value = value * 10 + (*s - '0');
        if (value > (long long)INT_MAX + negative)
            return -1;
    }
    if (*s != '\0')
        return -1;
    *out = (int)(negative ? -value : value);
    return 0;
}
