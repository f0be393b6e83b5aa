#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* 32-bit FNV-1a hash of a NUL-terminated string. */
uint32_t fnv1a(const char *s)
{
    uint32_t hash = 2166136261u;
    while (*s != '\0') {
        hash ^= (unsigned char)*s++;
        hash *= 16777619u;
    }
    return hash;
}

struct entry {
    const char *key;   /* NULL: the slot is free */
    int value;
};

struct table {
    struct entry *slots;
    size_t capacity;   /* a power of two */
};

/* The entry for key, or NULL if the table does not hold it. */
struct entry *table_find(const struct table *t, const char *key)
{
    size_t mask = t->capacity - 1;
    size_t index = fnv1a(key) & mask;
    for (size_t probes = 0; probes < t->capacity; probes++) {
        struct entry *slot = &t->slots[index];
        if (slot->key == NULL)
            return NULL;
        if (strcmp(slot->key, key) == 0)
            return slot;
        index = (index + 1) & mask;
    }
    return NULL;
}
