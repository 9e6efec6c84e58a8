/* The FOCUS backend's tiled attention on a CPU, reading K/V where they lie in the paged cache.
 *
 * One task per (request, KV head[, slice of its query rows]); OpenMP spreads the tasks over
 * the threads torch uses (the library resolves libgomp to the copy torch already loaded). A
 * task walks its request's tiles (kernels/sparse_attention.py, KeyTiles): a range tile
 * [start, end) is cut at cache-block boundaries into runs of rows of one block, a point tile
 * gives one row per point (-1: none). Each run's scores are computed for all of the task's
 * query rows at once, with the key's head_dim loop outside and the run's rows inside, so a
 * cache layout that stores K transposed per block (CPU_ATTN's [head_dim, block_size]) is read
 * as contiguous vectors; V is read row by row.
 *
 * Without sink mass: one pass, online softmax (running max and sum, rescaled accumulator).
 * With sink mass: a first pass over K finds each query row's max and sum; a second computes
 * the normalised probabilities, adds them to `mass[request, kv head, position]` and, if the
 * output is wanted, the accumulator. Floats throughout; bfloat16 caches and queries are
 * widened on load and the output rounded to nearest even.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t block, row, head, dim;
} strides_t;

typedef struct {
    const void *q;          /* [tokens, heads, head_dim], row stride q_stride, inner dense */
    void *out;              /* same shape, row stride out_stride, inner dense */
    const void *k;          /* key cache base */
    const void *v;          /* value cache base */
    strides_t ks, vs;       /* element strides of the [blocks, block_size, kv_heads, D] views */
    const int32_t *block_table;
    int64_t table_stride;
    const int32_t *tiles;   /* [NT, 3] start, end, point offset (-1: range) */
    const int32_t *points;  /* [NP] positions, -1 for none */
    const int32_t *reqs;    /* [NR, 5] request, first query row, end row, first tile, end tile */
    int64_t num_reqs;
    float *mass;            /* NULL, or [NR, kv_heads, mass_width] */
    int64_t mass_width;
    int64_t q_stride, out_stride;
    int32_t num_heads, num_kv_heads, head_dim, block_size;
    int32_t bf16;           /* 1: q, out and the cache are bfloat16; 0: float32 */
    int32_t want_out;
    int32_t splits;         /* query-row slices per (request, KV head); 1 with mass */
    float scale;
} focus_args_t;

static inline float widen(const void *base, int64_t index, int bf16) {
    if (bf16) {
        uint32_t bits = ((uint32_t)((const uint16_t *)base)[index]) << 16;
        float value;
        memcpy(&value, &bits, sizeof value);
        return value;
    }
    return ((const float *)base)[index];
}

static inline void store(void *base, int64_t index, float value, int bf16) {
    if (!bf16) {
        ((float *)base)[index] = value;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        bits = 0x7fc00000u; /* NaN */
    } else {
        bits += 0x7fffu + ((bits >> 16) & 1u);
    }
    ((uint16_t *)base)[index] = (uint16_t)(bits >> 16);
}

/* exp(x) for x <= 0 (scores minus their max), branch-free so that loops over it vectorise:
 * x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial (relative error ~2e-7);
 * 0 below -87 (where float32's exp underflows anyway). */
static inline float exp_nonpositive(float x) {
    const float clamped = x < -87.0f ? -87.0f : x;
    float n = floorf(clamped * 1.44269504f + 0.5f);
    float r = clamped - n * 0.693145752f - n * 1.42860677e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x > -87.0f ? p * scale : 0.0f; /* -inf (a masked column) gives 0 */
}

#define LANES 16 /* columns per score vector; head_dim and block_size are multiples */
#define ROWS 4   /* query rows per micro-kernel */
#define MAX_COLUMNS 256

/* The keys of one run, as columns of a [head_dim, columns] float matrix (row stride
 * `stride`): column c is position `position0 + c`, valid for c in [lo, hi). */
typedef struct {
    const float *keys;
    int64_t stride;
    const float *values; /* [columns, head_dim], row stride `value_stride` */
    int64_t value_stride;
    int32_t columns, lo, hi, position0;
} run_t;

/* The next run of rows of one cache block in the request's key set after (tile, offset);
 * 0 when the key set is done. */
static int next_run(const focus_args_t *a, int32_t req, int32_t *tile, int32_t *offset,
                    int32_t tile_end, int32_t *block_row, int32_t *count, int32_t *position,
                    int64_t *block) {
    const int32_t bs = a->block_size;
    while (*tile < tile_end) {
        const int32_t *t = a->tiles + 3 * (int64_t)(*tile);
        const int32_t start = t[0], end = t[1], point_base = t[2];
        if (start + *offset >= end) {
            (*tile)++;
            *offset = 0;
            continue;
        }
        if (point_base < 0) {
            *position = start + *offset;
            *count = bs - *position % bs;
            if (*count > end - *position) *count = end - *position;
            *offset += *count;
        } else {
            *position = a->points[point_base + *offset];
            *count = 1;
            *offset += 1;
            if (*position < 0) continue;
        }
        *block = a->block_table[(int64_t)req * a->table_stride + *position / bs];
        *block_row = *position % bs;
        return 1;
    }
    return 0;
}

/* Makes `run` for rows [row, row + count) of cache block `block`: float32 caches in
 * CPU_ATTN's layout are read in place (K's columns widened to whole vectors of the block),
 * anything else is copied into the task's buffers first. */
static void load_run(const focus_args_t *a, int32_t kv_head, int64_t block, int32_t row,
                     int32_t count, int32_t position, float *key_buffer, float *value_buffer,
                     run_t *run) {
    const int32_t D = a->head_dim;
    const int64_t key_base = block * a->ks.block + (int64_t)kv_head * a->ks.head;
    const int64_t value_base = block * a->vs.block + (int64_t)kv_head * a->vs.head;
    if (!a->bf16 && a->ks.row == 1) {
        const int32_t first = row - row % LANES;
        const int32_t last = (row + count + LANES - 1) / LANES * LANES;
        run->keys = (const float *)a->k + key_base + first;
        run->stride = a->ks.dim;
        run->columns = last - first;
        run->lo = row - first;
    } else {
        run->columns = (count + LANES - 1) / LANES * LANES;
        run->lo = 0;
        for (int32_t d = 0; d < D; d++) {
            float *dst = key_buffer + (int64_t)d * MAX_COLUMNS;
            const int64_t at = key_base + d * a->ks.dim + (int64_t)row * a->ks.row;
            for (int32_t j = 0; j < count; j++) dst[j] = widen(a->k, at + j * a->ks.row, a->bf16);
            for (int32_t j = count; j < run->columns; j++) dst[j] = 0.0f;
        }
        run->keys = key_buffer;
        run->stride = MAX_COLUMNS;
    }
    run->hi = run->lo + count;
    run->position0 = position - run->lo;
    if (!a->bf16 && a->vs.dim == 1) {
        run->values = (const float *)a->v + value_base + (int64_t)(row - run->lo) * a->vs.row;
        run->value_stride = a->vs.row;
    } else {
        for (int32_t j = 0; j < count; j++) {
            float *dst = value_buffer + (int64_t)(run->lo + j) * D;
            const int64_t at = value_base + (int64_t)(row + j) * a->vs.row;
            for (int32_t d = 0; d < D; d++) dst[d] = widen(a->v, at + d * a->vs.dim, a->bf16);
        }
        run->values = value_buffer;
        run->value_stride = D;
    }
}

/* GCC / Clang vector extension: one vector of LANES floats (split by the compiler where the
 * machine's vectors are narrower). Loads and stores go through memcpy (no alignment). */
typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));

static inline lanes_t load_lanes(const float *src) {
    lanes_t v;
    memcpy(&v, src, sizeof v);
    return v;
}

/* scores[i, c] = q_i . K[:, c] for rows [0, rows) (rows a multiple of ROWS, queries padded)
 * and columns [0, run->columns); columns outside [lo, hi) are -inf. A ROWS x LANES tile of
 * scores stays in registers over head_dim. */
static void run_scores(const run_t *run, int32_t D, const float *queries, int32_t rows,
                       float *scores) {
    for (int32_t i0 = 0; i0 < rows; i0 += ROWS) {
        const float *q0 = queries + (int64_t)i0 * D;
        for (int32_t c0 = 0; c0 < run->columns; c0 += LANES) {
            lanes_t t0 = {0}, t1 = {0}, t2 = {0}, t3 = {0};
            const float *k = run->keys + c0;
            for (int32_t d = 0; d < D; d++, k += run->stride) {
                const lanes_t kv = load_lanes(k);
                t0 += q0[d] * kv;
                t1 += q0[D + d] * kv;
                t2 += q0[2 * D + d] * kv;
                t3 += q0[3 * D + d] * kv;
            }
            float *dst = scores + (int64_t)i0 * MAX_COLUMNS + c0;
            memcpy(dst, &t0, sizeof t0);
            memcpy(dst + MAX_COLUMNS, &t1, sizeof t1);
            memcpy(dst + 2 * MAX_COLUMNS, &t2, sizeof t2);
            memcpy(dst + 3 * MAX_COLUMNS, &t3, sizeof t3);
        }
    }
    for (int32_t i = 0; i < rows; i++) {
        float *row = scores + (int64_t)i * MAX_COLUMNS;
        for (int32_t c = 0; c < run->lo; c++) row[c] = -INFINITY;
        for (int32_t c = run->hi; c < run->columns; c++) row[c] = -INFINITY;
    }
}

/* acc[i, :] += sum over valid columns c of p[i, c] V[c, :]; a ROWS x LANES tile of the
 * accumulator stays in registers over the run's rows. */
static void run_values(const run_t *run, int32_t D, const float *probs, int32_t rows,
                       float *acc) {
    for (int32_t i0 = 0; i0 < rows; i0 += ROWS) {
        const float *p0 = probs + (int64_t)i0 * MAX_COLUMNS;
        for (int32_t d0 = 0; d0 < D; d0 += LANES) {
            float *a0 = acc + (int64_t)i0 * D + d0;
            lanes_t t0 = load_lanes(a0), t1 = load_lanes(a0 + D);
            lanes_t t2 = load_lanes(a0 + 2 * D), t3 = load_lanes(a0 + 3 * D);
            const float *v = run->values + (int64_t)run->lo * run->value_stride + d0;
            for (int32_t c = run->lo; c < run->hi; c++, v += run->value_stride) {
                const lanes_t vv = load_lanes(v);
                t0 += p0[c] * vv;
                t1 += p0[MAX_COLUMNS + c] * vv;
                t2 += p0[2 * MAX_COLUMNS + c] * vv;
                t3 += p0[3 * MAX_COLUMNS + c] * vv;
            }
            memcpy(a0, &t0, sizeof t0);
            memcpy(a0 + D, &t1, sizeof t1);
            memcpy(a0 + 2 * D, &t2, sizeof t2);
            memcpy(a0 + 3 * D, &t3, sizeof t3);
        }
    }
}

static float row_maximum(const float *row, int32_t columns, float start) {
    float lanes[LANES];
    for (int32_t l = 0; l < LANES; l++) lanes[l] = start;
    for (int32_t c = 0; c < columns; c += LANES)
        for (int32_t l = 0; l < LANES; l++) lanes[l] = row[c + l] > lanes[l] ? row[c + l] : lanes[l];
    float best = start;
    for (int32_t l = 0; l < LANES; l++) best = lanes[l] > best ? lanes[l] : best;
    return best;
}

/* row[c] <- exp(row[c] - shift) * factor; returns the sum of exp(row[c] - shift). */
static float exponentiate(float *row, int32_t columns, float shift, float factor, int keep) {
    float lanes[LANES] = {0};
    for (int32_t c = 0; c < columns; c += LANES)
        for (int32_t l = 0; l < LANES; l++) {
            const float e = exp_nonpositive(row[c + l] - shift);
            lanes[l] += e;
            if (keep) row[c + l] = e * factor;
        }
    float total = 0.0f;
    for (int32_t l = 0; l < LANES; l++) total += lanes[l];
    return total;
}

/* Folds a row of scores into its running max and sum (online softmax); with `keep`, the
 * row becomes exp(score - new max). Returns the factor for what was summed before. */
static float fold_row(float *row, int32_t columns, float *row_max, float *row_sum, int keep) {
    const float best = row_maximum(row, columns, *row_max);
    const float rescale = exp_nonpositive(*row_max - best);
    *row_sum = *row_sum * rescale + exponentiate(row, columns, best, 1.0f, keep);
    *row_max = best;
    return rescale;
}

/* Per-thread scratch, in floats, for tasks of up to `rows` query rows. */
static int64_t scratch_floats(int64_t rows, int32_t D) {
    const int64_t padded = (rows + ROWS - 1) / ROWS * ROWS;
    return padded * (2 * (int64_t)D + MAX_COLUMNS + 2) + 2 * (int64_t)D * MAX_COLUMNS;
}

static void task(const focus_args_t *a, int64_t index, float *work) {
    const int32_t D = a->head_dim;
    const int32_t group = a->num_heads / a->num_kv_heads;
    const int64_t per_req = (int64_t)a->num_kv_heads * a->splits;
    const int32_t listed = (int32_t)(index / per_req);
    const int32_t kv_head = (int32_t)((index % per_req) / a->splits);
    const int32_t slice = (int32_t)(index % a->splits);
    const int32_t *r = a->reqs + 5 * (int64_t)listed;
    const int32_t req = r[0], all_rows = (r[2] - r[1]) * group;
    const int32_t per_slice = (all_rows + a->splits - 1) / a->splits;
    const int32_t row_lo = slice * per_slice;
    int32_t rows = all_rows - row_lo;
    if (rows > per_slice) rows = per_slice;
    if (rows <= 0) return;
    const int32_t padded = (rows + ROWS - 1) / ROWS * ROWS;

    float *queries = work, *acc = queries + (int64_t)padded * D;
    float *scores = acc + (int64_t)padded * D, *row_max = scores + (int64_t)padded * MAX_COLUMNS;
    float *row_sum = row_max + padded, *key_buffer = row_sum + padded;
    float *value_buffer = key_buffer + (int64_t)D * MAX_COLUMNS;
    /* row i: query head kv_head * group + g of token t (flat = t * group + g) */
    for (int32_t i = 0; i < padded; i++) {
        const int32_t flat = row_lo + i, t = flat / group, g = flat % group;
        const int64_t at = (int64_t)(r[1] + t) * a->q_stride + (int64_t)(kv_head * group + g) * D;
        for (int32_t d = 0; d < D; d++)
            queries[(int64_t)i * D + d] = i < rows ? a->scale * widen(a->q, at + d, a->bf16) : 0.0f;
        row_max[i] = -INFINITY;
        row_sum[i] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * padded * D);

    run_t run;
    int32_t tile, offset, block_row, count, position;
    int64_t block;
    float *mass = NULL;
    if (a->mass != NULL) {
        /* first pass: each row's max and sum over the whole key set, from K alone */
        mass = a->mass + ((int64_t)listed * a->num_kv_heads + kv_head) * a->mass_width;
        tile = r[3], offset = 0;
        while (next_run(a, req, &tile, &offset, r[4], &block_row, &count, &position, &block)) {
            load_run(a, kv_head, block, block_row, count, position, key_buffer, value_buffer, &run);
            run_scores(&run, D, queries, padded, scores);
            for (int32_t i = 0; i < rows; i++)
                fold_row(scores + (int64_t)i * MAX_COLUMNS, run.columns, row_max + i, row_sum + i, 0);
        }
    }
    tile = r[3], offset = 0;
    while (next_run(a, req, &tile, &offset, r[4], &block_row, &count, &position, &block)) {
        load_run(a, kv_head, block, block_row, count, position, key_buffer, value_buffer, &run);
        run_scores(&run, D, queries, padded, scores);
        for (int32_t i = 0; i < rows; i++) {
            float *row = scores + (int64_t)i * MAX_COLUMNS;
            if (mass != NULL) { /* normalised probabilities */
                exponentiate(row, run.columns, row_max[i], 1.0f / row_sum[i], 1);
                continue;
            }
            const float rescale = fold_row(row, run.columns, row_max + i, row_sum + i, 1);
            float *dst = acc + (int64_t)i * D;
            for (int32_t d = 0; d < D; d++) dst[d] *= rescale;
        }
        for (int32_t i = rows; i < padded; i++) /* padding rows attend nothing */
            memset(scores + (int64_t)i * MAX_COLUMNS, 0, sizeof(float) * run.columns);
        if (mass != NULL) {
            for (int32_t c = run.lo; c < run.hi; c++) {
                float total = 0.0f;
                for (int32_t i = 0; i < rows; i++) total += scores[(int64_t)i * MAX_COLUMNS + c];
                if (run.position0 + c < a->mass_width) mass[run.position0 + c] += total;
            }
        }
        if (a->want_out) run_values(&run, D, scores, padded, acc);
    }
    if (!a->want_out) return;
    for (int32_t i = 0; i < rows; i++) {
        const int32_t flat = row_lo + i, t = flat / group, g = flat % group;
        const int64_t at = (int64_t)(r[1] + t) * a->out_stride + (int64_t)(kv_head * group + g) * D;
        const float inverse = mass != NULL ? 1.0f : (row_sum[i] > 0.0f ? 1.0f / row_sum[i] : 0.0f);
        for (int32_t d = 0; d < D; d++) store(a->out, at + d, acc[(int64_t)i * D + d] * inverse, a->bf16);
    }
}

/* Returns 0; -1 when a size is outside what the kernel handles (block_size and head_dim
 * multiples of 16, at most 256); -2 when scratch memory could not be had. */
int focus_tiled_attention(const focus_args_t *a) {
    if (a->block_size > MAX_COLUMNS || a->block_size % LANES || a->head_dim > MAX_COLUMNS ||
        a->head_dim % LANES || a->num_kv_heads <= 0 || a->splits <= 0)
        return -1;
    const int64_t num_tasks = a->num_reqs * a->num_kv_heads * a->splits;
    const int32_t group = a->num_heads / a->num_kv_heads;
    int64_t most_rows = 0;
    for (int64_t i = 0; i < a->num_reqs; i++) {
        const int64_t rows = (int64_t)(a->reqs[5 * i + 2] - a->reqs[5 * i + 1]) * group;
        if (rows > most_rows) most_rows = rows;
    }
    const int64_t floats = scratch_floats((most_rows + a->splits - 1) / a->splits, a->head_dim);
    int failed = 0;
#pragma omp parallel
    {
        float *work = (float *)malloc(sizeof(float) * floats);
#pragma omp for schedule(dynamic, 1)
        for (int64_t index = 0; index < num_tasks; index++) {
            if (work != NULL) {
                task(a, index, work);
            } else {
#pragma omp atomic write
                failed = 1;
            }
        }
        free(work);
    }
    return failed ? -2 : 0;
}
