/*
 * c-embed: generates tokens with a model compiled into this program by CMake's kiln_add_model.
 *
 *   c-embed --prompt-ids 6403,1980,253 [-n 20] [--temperature T] [--top-k K] [--top-p P] [--seed S]
 *           [--threads N] [--weights PATH] [--ignore-eos] [--text]
 *
 * Prints the generated token ids on one line, separated by spaces, or with --text the generated text
 * (the tokens' bytes from kiln_model_token_bytes). Like `kiln run`, it stops at the model's
 * end-of-sequence token (not printed) unless --ignore-eos is given.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kiln_model.h"

#ifndef KILN_MODEL_THREADS
#define KILN_MODEL_THREADS 0
#endif
#ifndef KILN_MODEL_WEIGHTS
#define KILN_MODEL_WEIGHTS "weights.bin"
#endif

static int fail(const char *what, int32_t status) {
    fprintf(stderr, "c-embed: %s: %s (%s)\n", what, kiln_last_error(), kiln_status_string(status));
    return 1;
}

static int parse_ids(const char *s, uint32_t **ids, size_t *n) {
    size_t cap = 16;
    *ids = malloc(cap * sizeof **ids);
    *n = 0;
    while (*ids && *s) {
        char *end;
        errno = 0;
        unsigned long v = strtoul(s, &end, 10);
        if (end == s || errno || v > 0xffffffffUL || (*end && *end != ',')) return -1;
        if (*n == cap && !(*ids = realloc(*ids, (cap *= 2) * sizeof **ids))) return -1;
        (*ids)[(*n)++] = (uint32_t)v;
        s = *end ? end + 1 : end;
    }
    return *ids && *n ? 0 : -1;
}

int main(int argc, char **argv) {
    const char *weights = KILN_MODEL_WEIGHTS, *prompt = NULL;
    long n = 20, threads = KILN_MODEL_THREADS;
    KilnSamplingParams params = {0.0f, 0, 1.0f, 0};
    int ignore_eos = 0, text = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--ignore-eos") || !strcmp(a, "--text")) {
            *(a[2] == 'i' ? &ignore_eos : &text) = 1;
            continue;
        }
        if (!v) { fprintf(stderr, "c-embed: %s needs a value\n", a); return 2; }
        if (!strcmp(a, "--prompt-ids")) prompt = v;
        else if (!strcmp(a, "-n")) n = strtol(v, NULL, 10);
        else if (!strcmp(a, "--temperature")) params.temperature = strtof(v, NULL);
        else if (!strcmp(a, "--top-k")) params.top_k = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--top-p")) params.top_p = strtof(v, NULL);
        else if (!strcmp(a, "--seed")) params.seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--threads")) threads = strtol(v, NULL, 10);
        else if (!strcmp(a, "--weights")) weights = v;
        else { fprintf(stderr, "c-embed: unknown option %s\n", a); return 2; }
        i++;
    }
    uint32_t *ids;
    size_t n_ids;
    if (!prompt || parse_ids(prompt, &ids, &n_ids)) {
        fprintf(stderr, "c-embed: give --prompt-ids as comma-separated token ids\n");
        return 2;
    }
    if (kiln_abi_version() != KILN_ABI_VERSION) {
        fprintf(stderr, "c-embed: library ABI %u, header %d\n", kiln_abi_version(), KILN_ABI_VERSION);
        return 1;
    }
    KilnModel *model;
    int32_t st = kiln_model_create(weights, (uint32_t)threads, 0, &model);
    if (st != KILN_OK) return fail("create", st);
    KilnSampler *sampler;
    if ((st = kiln_sampler_create(&params, &sampler)) != KILN_OK) return fail("sampler", st);
    if ((st = kiln_model_prefill(model, ids, n_ids)) != KILN_OK) return fail("prefill", st);
    uint32_t eos = ignore_eos ? KILN_NO_TOKEN : kiln_model_eos_token(model);
    for (long i = 0; i < n; i++) {
        uint32_t t;
        if ((st = kiln_sampler_sample(sampler, model, &t)) != KILN_OK) return fail("sample", st);
        if (t == eos) break;
        if (text) {
            const uint8_t *bytes;
            size_t len;
            if ((st = kiln_model_token_bytes(model, t, &bytes, &len)) != KILN_OK) return fail("token text", st);
            fwrite(bytes, 1, len, stdout);
        } else {
            printf(i ? " %u" : "%u", t);
        }
        if (i + 1 == n || kiln_model_position(model) >= kiln_model_context_length(model)) break;
        if ((st = kiln_model_decode(model, t)) != KILN_OK) return fail("decode", st);
    }
    if (!text) printf("\n");
    kiln_sampler_free(sampler);
    kiln_model_free(model);
    free(ids);
    return 0;
}
