/*
 * The native gate: llama.cpp's eval callback (ggml_backend_sched_eval_callback)
 * in C, so that Python is out of the per-node and per-token loop.
 *
 * Ask phase: with no job (most ubatches of a prompt-scoped patch) it returns
 * false at once; otherwise it compares the node's name with the few
 * "l_out-L" names of this ubatch.  Data phase: it reads the rows to edit with
 * ggml_backend_tensor_get, applies the edit exactly as edge_reft.loreft does,
 * h + (h B^T + c) A (LoReFT: A = R, B = W - R, c = b; every type: edge_reft/interventions.py),
 * in float32, and writes them back with
 * ggml_backend_tensor_set (CPU and GPU buffers alike).
 *
 * No ggml header is needed: the few ggml functions used are passed in as
 * pointers by the Python side (native.py), and the only struct
 * member read is ggml_tensor.type, the first member.  Errors never abort the
 * graph: they are recorded and raised by Python after llama_decode.
 *
 * It is also a (trivial) Python extension module so that setuptools builds it
 * with the package; Python loads it with ctypes.  Portable C99 (gcc, clang,
 * MSVC): the exported functions are marked for the Windows DLL export table and
 * for default visibility elsewhere.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(_WIN32)
#define GATE_API __declspec(dllexport)
#else
#define GATE_API __attribute__((visibility("default")))
#endif

#define GATE_ABI 1
#define GGML_TYPE_F32 0

typedef const char *(*get_name_fn)(const void *t);
typedef int64_t (*nelements_fn)(const void *t);
typedef bool (*contiguous_fn)(const void *t);
typedef void (*tensor_get_fn)(const void *t, void *data, size_t offset, size_t size);
typedef void (*tensor_set_fn)(void *t, const void *data, size_t offset, size_t size);

/* One intervention's edit of one layer in this ubatch (arrays owned by Python). */
typedef struct {
    int32_t rank;
    int32_t n_rows;
    const int32_t *rows;    /* tensor rows to edit, relative to the job's lo */
    const float *rotate;    /* (rank, d) R */
    const float *delta;     /* (rank, d) B (W - R for LoReFT) */
    const float *bias;      /* (rank) b */
} gate_edit;

/* Everything to do to one l_out-L tensor in this ubatch. */
typedef struct {
    char name[64];
    int64_t n_rows;         /* rows the tensor must have */
    int64_t lo, span;       /* rows lo .. lo+span-1 are read and written back */
    int32_t n_edits;
    const gate_edit *edits; /* applied in order */
} gate_job;

typedef struct {
    int32_t abi;
    int32_t n_embd;
    int32_t n_jobs;
    const gate_job *jobs;
    get_name_fn get_name;
    nelements_fn nelements;
    contiguous_fn is_contiguous;
    tensor_get_fn tensor_get;
    tensor_set_fn tensor_set;
    float *scratch;
    int64_t scratch_floats;
    int32_t error;          /* 0 = none */
    char message[256];
    int64_t asked, edited;  /* counters, for tests */
} gate_state;

static void fail(gate_state *g, int code, const char *msg) {
    if (g->error == 0) {
        g->error = code;
        snprintf(g->message, sizeof g->message, "%s", msg);
    }
}

static void apply_edit(const gate_edit *e, float *h, int32_t d) {
    float t[64];
    for (int32_t j0 = 0; j0 < e->rank; j0 += 64) {          /* ranks above 64 in blocks */
        int32_t nj = e->rank - j0 < 64 ? e->rank - j0 : 64;
        for (int32_t j = 0; j < nj; j++) {
            const float *w = e->delta + (int64_t)(j0 + j) * d;
            float acc = 0.0f;
            for (int32_t k = 0; k < d; k++) acc += h[k] * w[k];
            t[j] = acc + e->bias[j0 + j];
        }
        for (int32_t j = 0; j < nj; j++) {
            const float *r = e->rotate + (int64_t)(j0 + j) * d;
            const float tj = t[j];
            for (int32_t k = 0; k < d; k++) h[k] += tj * r[k];
        }
    }
}

static void run_job(gate_state *g, void *tensor, const gate_job *job) {
    const int32_t d = g->n_embd;
    if (*(const int32_t *)tensor != GGML_TYPE_F32 || !g->is_contiguous(tensor)) {
        fail(g, 2, "l_out is not a contiguous F32 tensor; refusing to write");
        return;
    }
    if (g->nelements(tensor) != job->n_rows * d) {
        fail(g, 3, "l_out does not have the rows of the submitted ubatch; refusing to write");
        return;
    }
    const int64_t n = job->span * d;
    if (n > g->scratch_floats) {
        float *p = realloc(g->scratch, (size_t)n * sizeof(float));
        if (!p) { fail(g, 4, "out of memory"); return; }
        g->scratch = p;
        g->scratch_floats = n;
    }
    const size_t off = (size_t)job->lo * d * sizeof(float), size = (size_t)n * sizeof(float);
    g->tensor_get(tensor, g->scratch, off, size);
    /* interventions in file order; each edits the output of the previous one */
    for (int32_t i = 0; i < job->n_edits; i++) {
        const gate_edit *e = &job->edits[i];
        for (int32_t k = 0; k < e->n_rows; k++) apply_edit(e, g->scratch + (int64_t)e->rows[k] * d, d);
    }
    g->tensor_set(tensor, g->scratch, off, size);
    g->edited++;
}

/* bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data) */
GATE_API bool edge_gate_eval(void *tensor, bool ask, void *user_data) {
    gate_state *g = (gate_state *)user_data;
    if (g->n_jobs == 0) return !ask;  /* the common case: nothing to edit in this ubatch */
    const char *name = g->get_name(tensor);
    for (int32_t i = 0; i < g->n_jobs; i++) {
        if (strcmp(name, g->jobs[i].name) == 0) {
            if (ask) { g->asked++; return true; }
            run_job(g, tensor, &g->jobs[i]);
            return true;
        }
    }
    return !ask;  /* never false in the data phase: that would skip the rest of the graph */
}

/* The ggml functions come as function pointers (ctypes passes their addresses). */
GATE_API gate_state *edge_gate_new(int32_t n_embd, get_name_fn get_name, nelements_fn nelements,
                                   contiguous_fn is_contiguous, tensor_get_fn tensor_get,
                                   tensor_set_fn tensor_set) {
    gate_state *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->abi = GATE_ABI;
    g->n_embd = n_embd;
    g->get_name = get_name;
    g->nelements = nelements;
    g->is_contiguous = is_contiguous;
    g->tensor_get = tensor_get;
    g->tensor_set = tensor_set;
    return g;
}

GATE_API void edge_gate_set_jobs(gate_state *g, int32_t n_jobs, const gate_job *jobs) {
    g->jobs = jobs;
    g->n_jobs = n_jobs;
}

/* Returns the error code (0 = none) and clears it; the message is copied to buf. */
GATE_API int32_t edge_gate_take_error(gate_state *g, char *buf, int32_t len) {
    int32_t code = g->error;
    if (code && buf && len > 0) snprintf(buf, (size_t)len, "%s", g->message);
    g->error = 0;
    g->message[0] = 0;
    return code;
}

GATE_API int64_t edge_gate_edited(const gate_state *g) { return g->edited; }

GATE_API int32_t edge_gate_abi(void) { return GATE_ABI; }

GATE_API void edge_gate_free(gate_state *g) {
    if (g) {
        free(g->scratch);
        free(g);
    }
}

static struct PyModuleDef gate_module = {PyModuleDef_HEAD_INIT, "_gate",
                                         "edge-reft's native eval callback (loaded with ctypes)",
                                         -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__gate(void) { return PyModule_Create(&gate_module); }
