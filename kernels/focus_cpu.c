/* The FOCUS backend's tiled attention on a CPU, reading K/V where they lie in the paged cache.
 *
 * One task per (request, KV head[, slice of its query rows]); OpenMP spreads the tasks over
 * the threads torch uses (the library resolves libgomp to the copy torch already loaded). A
 * task walks its request's tiles (kernels/sparse_attention.py, KeyTiles): a range tile
 * [start, end) is cut at cache-block boundaries into runs of rows of one block, a point tile
 * into runs of its consecutive points (ascending by one, within one block; -1: none). Each run's scores are computed for all of the task's
 * query rows at once, with the key's head_dim loop outside and the run's rows inside, so a
 * cache layout that stores K transposed per block (CPU_ATTN's [head_dim, block_size]) is read
 * as contiguous vectors; V is read row by row.
 *
 * Without sink mass: one pass, online softmax (running max and sum, rescaled accumulator).
 * With sink mass, where the task's prompt-key scores fit a per-thread stash (`stash_floats`):
 * the same one pass, also keeping each prompt key's scores; at the end their normalised
 * probabilities are added to `mass[request, kv head, position]`. Otherwise two passes: the
 * first over K finds each query row's max and sum, the second computes the normalised
 * probabilities, adds them to the mass and, if the output is wanted, the accumulator. Floats throughout; bfloat16 caches and queries are
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
    int64_t stash_floats;   /* per thread, the most floats of stashed scores (0: two passes) */
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
#define PREFETCH_ROWS 8 /* rows of K (head_dim) or V (keys) read ahead */
#define WIDE 4   /* vectors per row of a micro-kernel's tile */
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
            /* consecutive positions within one cache block make one run */
            *position = a->points[point_base + *offset];
            *offset += 1;
            if (*position < 0) continue;
            *count = 1;
            while (start + *offset < end && (*position + *count) % bs != 0 &&
                   a->points[point_base + *offset] == *position + *count) {
                (*count)++;
                (*offset)++;
            }
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

/* The micro-kernels' step: t[i][w] += a[i * a_stride] * b[w * LANES .. + LANES) over a ROWS x
 * WIDE tile (b: WIDE consecutive vectors of one row of K or V); `ahead` is read ahead. */
static inline void tile_update(lanes_t t[ROWS][WIDE], const float *a, int64_t a_stride,
                               const float *b, const float *ahead) {
    __builtin_prefetch(ahead);
    __builtin_prefetch(ahead + 2 * LANES);
    lanes_t row[WIDE];
    for (int32_t w = 0; w < WIDE; w++) row[w] = load_lanes(b + w * LANES);
    for (int32_t i = 0; i < ROWS; i++) {
        const float x = a[(int64_t)i * a_stride];
        for (int32_t w = 0; w < WIDE; w++) t[i][w] += x * row[w];
    }
}

/* scores[i, c] = q_i . K[:, c] for rows [0, rows) (rows a multiple of ROWS, queries padded)
 * and columns [0, run->columns); columns outside [lo, hi) are -inf. A ROWS x (WIDE x LANES)
 * tile of scores stays in registers over head_dim, so each step of the head_dim loop reads
 * WIDE consecutive vectors of K's row (one stream through a transposed block). */
static void run_scores(const run_t *run, int32_t D, const float *queries, int32_t rows,
                       float *scores) {
    for (int32_t i0 = 0; i0 < rows; i0 += ROWS) {
        const float *q0 = queries + (int64_t)i0 * D;
        float *dst = scores + (int64_t)i0 * MAX_COLUMNS;
        int32_t c0 = 0;
        for (; c0 + WIDE * LANES <= run->columns; c0 += WIDE * LANES) {
            lanes_t t[ROWS][WIDE];
            memset(t, 0, sizeof t);
            const float *k = run->keys + c0;
            for (int32_t d = 0; d < D; d++, k += run->stride)
                tile_update(t, q0 + d, D, k, k + PREFETCH_ROWS * run->stride);
            for (int32_t i = 0; i < ROWS; i++)
                for (int32_t w = 0; w < WIDE; w++)
                    memcpy(dst + (int64_t)i * MAX_COLUMNS + c0 + w * LANES, &t[i][w], sizeof(lanes_t));
        }
        for (; c0 < run->columns; c0 += LANES) {
            lanes_t t[ROWS];
            memset(t, 0, sizeof t);
            const float *k = run->keys + c0;
            for (int32_t d = 0; d < D; d++, k += run->stride) {
                const lanes_t kv = load_lanes(k);
                for (int32_t i = 0; i < ROWS; i++) t[i] += q0[(int64_t)i * D + d] * kv;
            }
            for (int32_t i = 0; i < ROWS; i++)
                memcpy(dst + (int64_t)i * MAX_COLUMNS + c0, &t[i], sizeof(lanes_t));
        }
    }
    for (int32_t i = 0; i < rows; i++) {
        float *row = scores + (int64_t)i * MAX_COLUMNS;
        for (int32_t c = 0; c < run->lo; c++) row[c] = -INFINITY;
        for (int32_t c = run->hi; c < run->columns; c++) row[c] = -INFINITY;
    }
}

/* acc[i, :] += sum over valid columns c of p[i, c] V[c, :]; a ROWS x (WIDE x LANES) tile of
 * the accumulator stays in registers over the run's rows, each of which is read as WIDE
 * consecutive vectors. */
static void run_values(const run_t *run, int32_t D, const float *probs, int32_t rows,
                       float *acc) {
    for (int32_t i0 = 0; i0 < rows; i0 += ROWS) {
        const float *p0 = probs + (int64_t)i0 * MAX_COLUMNS;
        float *a0 = acc + (int64_t)i0 * D;
        int32_t d0 = 0;
        for (; d0 + WIDE * LANES <= D; d0 += WIDE * LANES) {
            lanes_t t[ROWS][WIDE];
            for (int32_t i = 0; i < ROWS; i++)
                for (int32_t w = 0; w < WIDE; w++) t[i][w] = load_lanes(a0 + (int64_t)i * D + d0 + w * LANES);
            const float *v = run->values + (int64_t)run->lo * run->value_stride + d0;
            for (int32_t c = run->lo; c < run->hi; c++, v += run->value_stride)
                tile_update(t, p0 + c, MAX_COLUMNS, v, v + PREFETCH_ROWS * run->value_stride);
            for (int32_t i = 0; i < ROWS; i++)
                for (int32_t w = 0; w < WIDE; w++) memcpy(a0 + (int64_t)i * D + d0 + w * LANES, &t[i][w], sizeof(lanes_t));
        }
        for (; d0 < D; d0 += LANES) {
            lanes_t t[ROWS];
            for (int32_t i = 0; i < ROWS; i++) t[i] = load_lanes(a0 + (int64_t)i * D + d0);
            const float *v = run->values + (int64_t)run->lo * run->value_stride + d0;
            for (int32_t c = run->lo; c < run->hi; c++, v += run->value_stride) {
                const lanes_t vv = load_lanes(v);
                for (int32_t i = 0; i < ROWS; i++) t[i] += p0[(int64_t)i * MAX_COLUMNS + c] * vv;
            }
            for (int32_t i = 0; i < ROWS; i++) memcpy(a0 + (int64_t)i * D + d0, &t[i], sizeof(lanes_t));
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

/* Starts reading the first rows of the run after (tile, offset) while this one computes
 * (the rows within a run are read ahead in run_scores / run_values). */
static void prefetch_next(const focus_args_t *a, int32_t req, int32_t kv_head, int32_t tile,
                          int32_t offset, int32_t tile_end) {
    int32_t block_row, count, position;
    int64_t block;
    if (!next_run(a, req, &tile, &offset, tile_end, &block_row, &count, &position, &block)) return;
    const char *k = (const char *)a->k, *v = (const char *)a->v;
    const int64_t bytes = a->bf16 ? 2 : 4;
    const int64_t key_at = block * a->ks.block + (int64_t)kv_head * a->ks.head + (int64_t)block_row * a->ks.row;
    const int64_t value_at = block * a->vs.block + (int64_t)kv_head * a->vs.head + (int64_t)block_row * a->vs.row;
    for (int32_t j = 0; j < PREFETCH_ROWS; j++) {
        __builtin_prefetch(k + bytes * (key_at + j * a->ks.dim));
        __builtin_prefetch(v + bytes * (value_at + j * a->vs.row));
    }
}

/* The number of prompt keys (positions below mass_width) in a request's key set, counted
 * with repeats: the size of its one-pass score stash. */
static int64_t prompt_keys_listed(const focus_args_t *a, const int32_t *r) {
    int64_t total = 0;
    for (int32_t t = r[3]; t < r[4]; t++) {
        const int32_t *tile = a->tiles + 3 * (int64_t)t;
        if (tile[2] < 0) {
            const int64_t hi = tile[1] < a->mass_width ? tile[1] : a->mass_width;
            if (hi > tile[0]) total += hi - tile[0];
        } else {
            total += tile[1] - tile[0];
        }
    }
    return total;
}

/* Sink mass from the stash: each stashed score's normalised probability, summed over the
 * task's rows (into the first row, in place), added at its position. */
static void mass_from_stash(float *stash, const int32_t *positions, int64_t listed,
                            int64_t capacity, int32_t rows, const float *row_max,
                            const float *row_sum, float *mass) {
    for (int32_t i = 0; i < rows; i++) {
        float *row = stash + i * capacity;
        const float shift = row_max[i], factor = 1.0f / row_sum[i];
        for (int64_t j = 0; j < listed; j++) row[j] = exp_nonpositive(row[j] - shift) * factor;
        if (i > 0)
            for (int64_t j = 0; j < listed; j++) stash[j] += row[j];
    }
    for (int64_t j = 0; j < listed; j++) mass[positions[j]] += stash[j];
}

/* One task. `stash` (capacity prompt keys x the task's rows, and their positions), when
 * given with sink mass, keeps the scores of the prompt keys so that one pass over K gives
 * both the softmax statistics and the mass; without it the mass takes a first pass over K
 * for the statistics and a second for the probabilities. */
static void task(const focus_args_t *a, int64_t index, float *work, float *stash,
                 int32_t *stash_positions, int64_t capacity) {
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
    int64_t stashed = 0;
    if (a->mass != NULL)
        mass = a->mass + ((int64_t)listed * a->num_kv_heads + kv_head) * a->mass_width;
    const int one_pass = mass != NULL && stash != NULL; /* capacity covers every request */
    if (mass != NULL && !one_pass) {
        /* first pass: each row's max and sum over the whole key set, from K alone */
        tile = r[3], offset = 0;
        while (next_run(a, req, &tile, &offset, r[4], &block_row, &count, &position, &block)) {
            load_run(a, kv_head, block, block_row, count, position, key_buffer, value_buffer, &run);
            run_scores(&run, D, queries, padded, scores);
            for (int32_t i = 0; i < rows; i++)
                fold_row(scores + (int64_t)i * MAX_COLUMNS, run.columns, row_max + i, row_sum + i, 0);
        }
    }
    const int normalised = mass != NULL && !one_pass; /* the second of two passes */
    tile = r[3], offset = 0;
    while (next_run(a, req, &tile, &offset, r[4], &block_row, &count, &position, &block)) {
        load_run(a, kv_head, block, block_row, count, position, key_buffer, value_buffer, &run);
        prefetch_next(a, req, kv_head, tile, offset, r[4]);
        run_scores(&run, D, queries, padded, scores);
        if (one_pass) { /* the prompt keys' scores, for the mass once the statistics are known */
            int32_t hi = run.hi;
            while (hi > run.lo && run.position0 + hi > a->mass_width) hi--;
            for (int32_t c = run.lo; c < hi; c++, stashed++) {
                stash_positions[stashed] = run.position0 + c;
                for (int32_t i = 0; i < rows; i++)
                    stash[i * capacity + stashed] = scores[(int64_t)i * MAX_COLUMNS + c];
            }
        }
        for (int32_t i = 0; i < rows; i++) {
            float *row = scores + (int64_t)i * MAX_COLUMNS;
            if (normalised) {
                exponentiate(row, run.columns, row_max[i], 1.0f / row_sum[i], 1);
                continue;
            }
            const float rescale = fold_row(row, run.columns, row_max + i, row_sum + i, a->want_out);
            if (!a->want_out) continue;
            float *dst = acc + (int64_t)i * D;
            for (int32_t d = 0; d < D; d++) dst[d] *= rescale;
        }
        for (int32_t i = rows; i < padded; i++) /* padding rows attend nothing */
            memset(scores + (int64_t)i * MAX_COLUMNS, 0, sizeof(float) * run.columns);
        if (normalised) {
            for (int32_t c = run.lo; c < run.hi; c++) {
                float total = 0.0f;
                for (int32_t i = 0; i < rows; i++) total += scores[(int64_t)i * MAX_COLUMNS + c];
                if (run.position0 + c < a->mass_width) mass[run.position0 + c] += total;
            }
        }
        if (a->want_out) run_values(&run, D, scores, padded, acc);
    }
    if (one_pass) mass_from_stash(stash, stash_positions, stashed, capacity, rows, row_max, row_sum, mass);
    if (!a->want_out) return;
    for (int32_t i = 0; i < rows; i++) {
        const int32_t flat = row_lo + i, t = flat / group, g = flat % group;
        const int64_t at = (int64_t)(r[1] + t) * a->out_stride + (int64_t)(kv_head * group + g) * D;
        const float inverse = normalised ? 1.0f : (row_sum[i] > 0.0f ? 1.0f / row_sum[i] : 0.0f);
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
    /* with sink mass, a score stash for one pass over K when it stays small: room for the
     * most prompt keys any request lists, for its most query rows */
    const int64_t padded_rows = (most_rows + ROWS - 1) / ROWS * ROWS;
    int64_t capacity = 0;
    if (a->mass != NULL) {
        for (int64_t i = 0; i < a->num_reqs; i++) {
            const int64_t keys = prompt_keys_listed(a, a->reqs + 5 * i);
            if (keys > capacity) capacity = keys;
        }
        if (padded_rows * capacity > a->stash_floats) capacity = 0;
    }
    int failed = 0;
#pragma omp parallel
    {
        float *work = (float *)malloc(sizeof(float) * floats);
        float *stash = NULL;
        int32_t *positions = NULL;
        if (capacity > 0) {
            stash = (float *)malloc(sizeof(float) * padded_rows * capacity);
            positions = (int32_t *)malloc(sizeof(int32_t) * capacity);
            if (stash == NULL || positions == NULL) { /* two passes instead */
                free(stash);
                free(positions);
                stash = NULL;
                positions = NULL;
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t index = 0; index < num_tasks; index++) {
            if (work != NULL) {
                task(a, index, work, stash, positions, capacity);
            } else {
#pragma omp atomic write
                failed = 1;
            }
        }
        free(work);
        free(stash);
        free(positions);
    }
    return failed ? -2 : 0;
}
