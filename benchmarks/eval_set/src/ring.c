#include <stddef.h>

struct ring {
    int *items;
    size_t capacity;
    size_t head;    /* index of the oldest item */
    size_t count;   /* items held */
};

/* Append value; returns -1 (and changes nothing) when the ring is full. */
int ring_push(struct ring *r, int value)
{
    if (r->count == r->capacity)
        return -1;
    size_t tail = (r->head + r->count) % r->capacity;
    r->items[tail] = value;
    r->count++;
    return 0;
}

/* Take the oldest value into *out; returns -1 when the ring is empty. */
int ring_pop(struct ring *r, int *out)
{
    if (r->count == 0)
        return -1;
    *out = r->items[r->head];
    r->head = (r->head + 1) % r->capacity;
    r->count--;
    return 0;
}
