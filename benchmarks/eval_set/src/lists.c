#include <stdlib.h>

struct node {
    int value;
    struct node *next;
};

/* Reverse a singly linked list; returns the new first node. */
struct node *list_reverse(struct node *head)
{
    struct node *previous = NULL;
    while (head != NULL) {
        struct node *following = head->next;
        head->next = previous;
        previous = head;
        head = following;
    }
    return previous;
}

/* Unlink and free every node holding value; returns how many were removed. */
int list_remove_all(struct node **link, int value)
{
    int removed = 0;
    while (*link != NULL) {
        struct node *current = *link;
        if (current->value == value) {
            *link = current->next;
            free(current);
            removed++;
        } else {
            link = &current->next;
        }
    }
    return removed;
}
