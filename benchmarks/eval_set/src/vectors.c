#include <math.h>

/* Normalise x by its root mean square, then scale each element by weight. */
void rms_norm(float *out, const float *x, const float *weight, int n)
{
    float sum_squares = 0.0f;
    for (int i = 0; i < n; i++)
        sum_squares += x[i] * x[i];
    float scale = 1.0f / sqrtf(sum_squares / n + 1e-5f);
    for (int i = 0; i < n; i++)
        out[i] = weight[i] * (x[i] * scale);
}

/* Turn n scores into probabilities, in place. */
void softmax(float *x, int n)
{
    float largest = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > largest)
            largest = x[i];
    float total = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - largest);
        total += x[i];
    }
    for (int i = 0; i < n; i++)
        x[i] /= total;
}

/* out = m * v, where m has rows rows and cols columns, stored row after row. */
void mat_vec(float *out, const float *m, const float *v, int rows, int cols)
{
    for (int r = 0; r < rows; r++) {
        const float *row = m + (long)r * cols;
        float sum = 0.0f;
        for (int c = 0; c < cols; c++)
            sum += row[c] * v[c];
        out[r] = sum;
    }
}

/* Sort a[0..n-1] in ascending order. */
void insertion_sort(int *a, int n)
{
    for (int i = 1; i < n; i++) {
        int key = a[i];
        int j = i - 1;
        while (j >= 0 && a[j] > key) {
            a[j + 1] = a[j];
            j--;
        }
        a[j + 1] = key;
    }
}
