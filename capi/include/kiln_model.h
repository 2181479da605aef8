/*
 * kiln_model.h — the C interface of a model compiled by `kiln compile MODEL --emit lib -o OUT`.
 *
 * OUT holds libkiln_model.a / libkiln_model.so (the model's generated kernels plus the Kiln runtime),
 * this header, weights.bin and manifest.json. The library contains the code of exactly one model; the
 * weights stay in weights.bin (memory-mapped at create time), and the library checks that the file is
 * the one its code was compiled with (size and blake3 hash) and that this CPU has the instruction-set
 * features the code was compiled for.
 *
 * Linking: the static library needs `-lpthread -ldl -lm` (CMake's kiln_add_model and kiln-build add
 * them); the shared library needs nothing more.
 *
 * Typical use:
 *
 *     KilnModel *m;
 *     if (kiln_model_create("OUT/weights.bin", 0, 0, &m) != KILN_OK) {
 *         fprintf(stderr, "%s\n", kiln_last_error());
 *         return 1;
 *     }
 *     kiln_model_prefill(m, prompt, n_prompt);          // prompt token ids
 *     KilnSamplingParams p = {0.0f, 0, 1.0f, 0};        // greedy
 *     KilnSampler *s; kiln_sampler_create(&p, &s);
 *     for (int i = 0; i < 20; i++) {
 *         uint32_t t; kiln_sampler_sample(s, m, &t);    // from the current logits
 *         printf("%u\n", t);
 *         kiln_model_decode(m, t);                      // append it, compute the next logits
 *     }
 *     kiln_sampler_free(s); kiln_model_free(m);
 *
 * Errors: every function that can fail returns a KilnStatus (KILN_OK = 0); on failure a message naming
 * the file or argument at fault is available from kiln_last_error() on the same thread. No function
 * aborts the process on bad input: NULL pointers, out-of-range token ids, a full context, calls in the
 * wrong order and internal errors all return a status.
 *
 * Thread safety: distinct models and samplers may be used from different threads at the same time. One
 * model (or sampler) must not be used by two threads at once — calls are not synchronised; guard a
 * shared handle with a mutex. Each model runs its steps on its own pool of `threads` worker threads.
 * kiln_last_error() is per thread.
 */
#ifndef KILN_MODEL_H
#define KILN_MODEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version of this header. kiln_abi_version() returns the library's; they must be equal. */
#define KILN_ABI_VERSION 1

typedef enum KilnStatus {
    KILN_OK = 0,
    KILN_ERR_NULL_ARGUMENT = 1,     /* a required pointer argument was NULL */
    KILN_ERR_INVALID_ARGUMENT = 2,  /* e.g. zero tokens, temperature < 0, top_p outside (0, 1] */
    KILN_ERR_IO = 3,                /* the weights file cannot be opened or read */
    KILN_ERR_WRONG_WEIGHTS = 4,     /* size or hash of the weights file does not match the code */
    KILN_ERR_UNSUPPORTED_CPU = 5,   /* this CPU lacks features the code was compiled for */
    KILN_ERR_ABI_MISMATCH = 6,      /* model code and runtime come from incompatible Kiln versions */
    KILN_ERR_BAD_TOKEN = 7,         /* a token id >= the vocabulary size */
    KILN_ERR_CONTEXT_FULL = 8,      /* the tokens do not fit in the remaining context */
    KILN_ERR_NOT_READY = 9,         /* decode, logits or sampling before any prefill */
    KILN_ERR_INTERNAL = 10,         /* a Kiln bug; a model that reports it must be freed */
    KILN_ERR_UNAVAILABLE = 11,      /* the model lacks what was asked for (e.g. a token table) */
} KilnStatus;

typedef struct KilnModel KilnModel;
typedef struct KilnSampler KilnSampler;

/* The C ABI version the library implements (compare with KILN_ABI_VERSION). */
uint32_t kiln_abi_version(void);

/*
 * Loads the model over `weights_path` (the weights.bin written beside the library). `threads`: worker
 * threads for a step, 0 = one per core, at most 1024. `context_length`: positions the KV cache holds, 0 = the model's
 * full context (larger values are capped to it). On success *out is the model; on failure *out is NULL.
 */
int32_t kiln_model_create(const char *weights_path, uint32_t threads, uint32_t context_length,
                          KilnModel **out);

/* Frees a model; NULL is ignored. */
void kiln_model_free(KilnModel *model);

/*
 * Appends `n_tokens` token ids (n_tokens >= 1) to the KV cache and computes the logits after the last
 * one. Usually the prompt, on an empty cache; may also append more tokens later.
 */
int32_t kiln_model_prefill(KilnModel *model, const uint32_t *tokens, size_t n_tokens);

/* Appends one token and computes the next logits. KILN_ERR_NOT_READY before the first prefill. */
int32_t kiln_model_decode(KilnModel *model, uint32_t token);

/*
 * The logits after the last prefill/decode: *logits points to *n_vocab floats owned by the model, valid
 * until the next call that changes it (prefill, decode, reset, free).
 */
int32_t kiln_model_logits(KilnModel *model, const float **logits, size_t *n_vocab);

/* Empties the KV cache; the next call must be a prefill. */
int32_t kiln_model_reset(KilnModel *model);

/* Vocabulary size; KV cache capacity in positions; tokens in the cache. 0 for a NULL model. */
size_t kiln_model_vocab_size(const KilnModel *model);
size_t kiln_model_context_length(const KilnModel *model);
size_t kiln_model_position(const KilnModel *model);

/* No such token. */
#define KILN_NO_TOKEN UINT32_MAX

/* The end-of-sequence token of the model's tokenizer (generation usually stops there, as `kiln run`
 * does), or KILN_NO_TOKEN if it has none or `model` is NULL. */
uint32_t kiln_model_eos_token(const KilnModel *model);

/*
 * Detokenization: the bytes token `token` stands for in text (empty for control tokens such as BOS/EOS),
 * so text is the concatenation over the generated ids (a piece may end inside a UTF-8 character).
 * *bytes points to *len bytes owned by the library, not NUL-terminated, valid while the program runs.
 * KILN_ERR_UNAVAILABLE for models whose tokenizer came from tokenizer.json (no per-token table).
 */
int32_t kiln_model_token_bytes(const KilnModel *model, uint32_t token, const uint8_t **bytes, size_t *len);

/* Sampling: temperature 0 is greedy (arg-max, ties to the lowest id); top_k 0 keeps all tokens; top_p 1
 * keeps all; the same seed gives the same tokens as `kiln run --seed`. */
typedef struct KilnSamplingParams {
    float temperature;
    uint32_t top_k;
    float top_p;
    uint64_t seed;
} KilnSamplingParams;

int32_t kiln_sampler_create(const KilnSamplingParams *params, KilnSampler **out);

/* Samples the next token from `model`'s current logits into *token. */
int32_t kiln_sampler_sample(KilnSampler *sampler, KilnModel *model, uint32_t *token);

/* Frees a sampler; NULL is ignored. */
void kiln_sampler_free(KilnSampler *sampler);

/* A short static description of a status code. */
const char *kiln_status_string(int32_t status);

/* The message of the last failed call on this thread ("" if none), valid until this thread's next failed
 * call. Successful calls leave it unchanged. */
const char *kiln_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* KILN_MODEL_H */
