/*
 * Misuse of the C ABI (kiln_model.h): every case must return the expected status with a message, and
 * nothing may crash. Linked against a library made by `kiln compile --emit lib` from a tiny model and run
 * under valgrind by tests/embed.rs.
 *
 *   misuse GOOD_WEIGHTS OTHER_MODEL_WEIGHTS TRUNCATED_WEIGHTS FLIPPED_BYTE_WEIGHTS MISSING_PATH
 *
 * Prints one line per failed check and ends with "N passed, M failed"; exits non-zero if any failed.
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "kiln_model.h"

static int passed, failed;

/* Checks that `status` is `want` and that the thread's last error mentions `needle`. */
static void expect(const char *what, int32_t status, int32_t want, const char *needle) {
    const char *msg = kiln_last_error();
    if (status != want) {
        printf("FAIL %s: status %d (%s), want %d (%s); last error: %s\n", what, status, kiln_status_string(status),
               want, kiln_status_string(want), msg);
        failed++;
    } else if (want != KILN_OK && (!msg || !*msg || (needle && !strstr(msg, needle)))) {
        printf("FAIL %s: message \"%s\" does not mention \"%s\"\n", what, msg ? msg : "(null)", needle ? needle : "");
        failed++;
    } else {
        passed++;
    }
}

static void check(const char *what, int ok) {
    if (ok) {
        passed++;
    } else {
        printf("FAIL %s\n", what);
        failed++;
    }
}

/* One thread's work on its own model: prefill a prompt and sample greedily; also fail one call, which must
 * set this thread's last error only. */
struct job {
    KilnModel *model;
    uint32_t token;
    int32_t status;
};

static void *run_job(void *arg) {
    struct job *j = arg;
    uint32_t ids[5] = {3, 1, 4, 1, 5};
    KilnSamplingParams greedy = {0.0f, 0, 1.0f, 0};
    KilnSampler *s = NULL;
    (void)kiln_model_decode(NULL, 1);
    j->status = kiln_model_prefill(j->model, ids, 5);
    if (j->status == KILN_OK) j->status = kiln_sampler_create(&greedy, &s);
    if (j->status == KILN_OK) j->status = kiln_sampler_sample(s, j->model, &j->token);
    kiln_sampler_free(s);
    return NULL;
}

/* Two models used from two threads at once agree, and errors stay in their thread. */
static void threads(const char *good) {
    struct job jobs[2] = {{NULL, 0, -1}, {NULL, 0, -1}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++) expect("create for a thread", kiln_model_create(good, 1, 16, &jobs[i].model), KILN_OK, NULL);
    if (!jobs[0].model || !jobs[1].model) return;
    char before[256];
    snprintf(before, sizeof before, "%s", kiln_last_error());
    for (int i = 0; i < 2; i++) check("pthread_create", pthread_create(&t[i], NULL, run_job, &jobs[i]) == 0);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < 2; i++) expect("steps on a thread", jobs[i].status, KILN_OK, NULL);
    check("two threads, two models, the same token", jobs[0].token == jobs[1].token);
    check("errors on other threads leave this thread's last error", strcmp(before, kiln_last_error()) == 0);
    for (int i = 0; i < 2; i++) kiln_model_free(jobs[i].model);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: misuse GOOD OTHER TRUNCATED FLIPPED MISSING\n");
        return 2;
    }
    const char *good = argv[1], *other = argv[2], *truncated = argv[3], *flipped = argv[4], *missing = argv[5];
    check("abi version", kiln_abi_version() == KILN_ABI_VERSION);

    /* Creation: NULL pointers and weights that do not belong to the code. */
    KilnModel *m = (KilnModel *)&passed; /* a non-NULL value that must be overwritten with NULL */
    expect("create(NULL path)", kiln_model_create(NULL, 1, 0, &m), KILN_ERR_NULL_ARGUMENT, "weights_path");
    check("create(NULL path) leaves *out NULL", m == NULL);
    expect("create(NULL out)", kiln_model_create(good, 1, 0, NULL), KILN_ERR_NULL_ARGUMENT, "out");
    expect("create(\"\")", kiln_model_create("", 1, 0, &m), KILN_ERR_INVALID_ARGUMENT, "empty");
    expect("create(10^8 threads)", kiln_model_create(good, 100000000, 0, &m), KILN_ERR_INVALID_ARGUMENT, "threads");
    expect("create(missing file)", kiln_model_create(missing, 1, 0, &m), KILN_ERR_IO, missing);
    expect("create(another model's weights)", kiln_model_create(other, 1, 0, &m), KILN_ERR_WRONG_WEIGHTS, other);
    expect("create(truncated weights)", kiln_model_create(truncated, 1, 0, &m), KILN_ERR_WRONG_WEIGHTS, "truncated");
    expect("create(one byte changed)", kiln_model_create(flipped, 1, 0, &m), KILN_ERR_WRONG_WEIGHTS, "hash");
    check("failed creates leave *out NULL", m == NULL);

    /* Calls on a NULL model. */
    uint32_t ids[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    const float *logits = NULL;
    size_t n_vocab = 0;
    uint32_t tok = 0;
    expect("prefill(NULL model)", kiln_model_prefill(NULL, ids, 3), KILN_ERR_NULL_ARGUMENT, "model");
    expect("decode(NULL model)", kiln_model_decode(NULL, 1), KILN_ERR_NULL_ARGUMENT, "model");
    expect("logits(NULL model)", kiln_model_logits(NULL, &logits, &n_vocab), KILN_ERR_NULL_ARGUMENT, "model");
    expect("reset(NULL model)", kiln_model_reset(NULL), KILN_ERR_NULL_ARGUMENT, "model");
    check("sizes of a NULL model are 0", kiln_model_vocab_size(NULL) == 0 && kiln_model_context_length(NULL) == 0 &&
                                             kiln_model_position(NULL) == 0);
    kiln_model_free(NULL);
    kiln_sampler_free(NULL);

    /* A real model with an 8-position context. */
    expect("create(good weights)", kiln_model_create(good, 1, 8, &m), KILN_OK, NULL);
    if (!m) {
        printf("%d passed, %d failed\n", passed, failed + 1);
        return 1;
    }
    size_t vocab = kiln_model_vocab_size(m);
    check("context capacity is 8", kiln_model_context_length(m) == 8);
    check("vocabulary is non-empty", vocab > 0);
    check("a model without a tokenizer has no EOS token", kiln_model_eos_token(m) == KILN_NO_TOKEN);
    check("a NULL model has no EOS token", kiln_model_eos_token(NULL) == KILN_NO_TOKEN);
    const uint8_t *piece = NULL;
    size_t piece_len = 0;
    expect("token_bytes(NULL model)", kiln_model_token_bytes(NULL, 1, &piece, &piece_len), KILN_ERR_NULL_ARGUMENT, "model");
    expect("token_bytes(NULL bytes)", kiln_model_token_bytes(m, 1, NULL, &piece_len), KILN_ERR_NULL_ARGUMENT, "bytes");
    expect("token_bytes without a tokenizer", kiln_model_token_bytes(m, 1, &piece, &piece_len), KILN_ERR_UNAVAILABLE,
           "token table");

    /* Order of calls. */
    expect("decode before prefill", kiln_model_decode(m, 1), KILN_ERR_NOT_READY, "prefill");
    expect("logits before prefill", kiln_model_logits(m, &logits, &n_vocab), KILN_ERR_NOT_READY, "prefill");
    KilnSamplingParams greedy = {0.0f, 0, 1.0f, 0};
    KilnSampler *s = NULL;
    expect("sampler_create(NULL params)", kiln_sampler_create(NULL, &s), KILN_ERR_NULL_ARGUMENT, "params");
    expect("sampler_create(NULL out)", kiln_sampler_create(&greedy, NULL), KILN_ERR_NULL_ARGUMENT, "out");
    KilnSamplingParams bad = {-1.0f, 0, 1.0f, 0};
    expect("sampler_create(temperature -1)", kiln_sampler_create(&bad, &s), KILN_ERR_INVALID_ARGUMENT, "temperature");
    bad.temperature = 1.0f;
    bad.top_p = 1.5f;
    expect("sampler_create(top_p 1.5)", kiln_sampler_create(&bad, &s), KILN_ERR_INVALID_ARGUMENT, "top_p");
    expect("sampler_create(greedy)", kiln_sampler_create(&greedy, &s), KILN_OK, NULL);
    expect("sample before prefill", kiln_sampler_sample(s, m, &tok), KILN_ERR_NOT_READY, "prefill");
    expect("sample(NULL sampler)", kiln_sampler_sample(NULL, m, &tok), KILN_ERR_NULL_ARGUMENT, "sampler");
    expect("sample(NULL token)", kiln_sampler_sample(s, m, NULL), KILN_ERR_NULL_ARGUMENT, "token");
    expect("sample(NULL model)", kiln_sampler_sample(s, NULL, &tok), KILN_ERR_NULL_ARGUMENT, "model");

    /* Bad prompts: none of them may change the cache. */
    expect("prefill(NULL tokens)", kiln_model_prefill(m, NULL, 3), KILN_ERR_NULL_ARGUMENT, "tokens");
    expect("prefill(0 tokens)", kiln_model_prefill(m, ids, 0), KILN_ERR_INVALID_ARGUMENT, "n_tokens");
    uint32_t oov[2] = {1, (uint32_t)vocab};
    expect("prefill(token id = vocab size)", kiln_model_prefill(m, oov, 2), KILN_ERR_BAD_TOKEN, "vocabulary");
    oov[1] = 0xffffffffu;
    expect("prefill(token id 2^32-1)", kiln_model_prefill(m, oov, 2), KILN_ERR_BAD_TOKEN, "vocabulary");
    expect("prefill(9 tokens > context 8)", kiln_model_prefill(m, ids, 9), KILN_ERR_CONTEXT_FULL, "context");
    check("failed prefills leave the cache empty", kiln_model_position(m) == 0);

    /* The model still works, and reaching the context limit is an error, not a crash. */
    expect("prefill(7 tokens)", kiln_model_prefill(m, ids, 7), KILN_OK, NULL);
    expect("logits(NULL out)", kiln_model_logits(m, NULL, &n_vocab), KILN_ERR_NULL_ARGUMENT, "logits");
    expect("logits(NULL n_vocab)", kiln_model_logits(m, &logits, NULL), KILN_ERR_NULL_ARGUMENT, "n_vocab");
    expect("logits", kiln_model_logits(m, &logits, &n_vocab), KILN_OK, NULL);
    check("logits cover the vocabulary", logits != NULL && n_vocab == vocab);
    expect("sample", kiln_sampler_sample(s, m, &tok), KILN_OK, NULL);
    check("sampled id is in the vocabulary", tok < vocab);
    expect("decode(token id = vocab size)", kiln_model_decode(m, (uint32_t)vocab), KILN_ERR_BAD_TOKEN, "vocabulary");
    expect("decode (8th position)", kiln_model_decode(m, tok), KILN_OK, NULL);
    expect("decode past the context", kiln_model_decode(m, tok), KILN_ERR_CONTEXT_FULL, "context");
    expect("prefill past the context", kiln_model_prefill(m, ids, 1), KILN_ERR_CONTEXT_FULL, "context");
    check("position stays at 8", kiln_model_position(m) == 8);

    /* Reset: decode needs a prefill again; the same prompt gives the same first token. */
    expect("reset", kiln_model_reset(m), KILN_OK, NULL);
    expect("decode after reset", kiln_model_decode(m, 1), KILN_ERR_NOT_READY, "prefill");
    uint32_t again = 0;
    expect("prefill after reset", kiln_model_prefill(m, ids, 7), KILN_OK, NULL);
    expect("sample after reset", kiln_sampler_sample(s, m, &again), KILN_OK, NULL);
    check("reset then the same prompt gives the same token", again == tok);

    /* Status strings exist for every code and for unknown ones. */
    for (int32_t c = -1; c <= 12; c++) check("status string", kiln_status_string(c) && *kiln_status_string(c));

    kiln_sampler_free(s);
    kiln_model_free(m);
    threads(good);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
