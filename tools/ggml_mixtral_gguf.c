/* ggml_mixtral_gguf.c: a synthetic Mixtral-8x7B-shape GGUF that llama.cpp loads, so that llama-bench
 * and moe-pack's runtime.baseline_bench time the same model shape on the same machine.
 *
 * Random Gaussian weights (std 0.02, norms 1) quantized once per distinct matrix shape and type with
 * ggml_quantize_chunk, then written for every layer and expert: timings do not depend on the values,
 * and the 16-17 GB of 32 layers take under a minute (dev-cpu: 41-57 s, most of it quantizing the
 * first layer's matrices) instead of the hours a per-expert quantization would.
 * Tensor names, shapes and metadata are those of llama.cpp's Mixtral GGUFs (architecture "llama",
 * 8 experts stacked per layer as ffn_{gate,up,down}_exps); the vocabulary is 32000 placeholder
 * tokens laid out as Mistral's SentencePiece one (<unk> <s> </s>, then the 256 byte tokens).
 *   --mix matched  attention Q4_K, experts Q2_K, output and token_embd F16: the bits of moe-pack's
 *                  4/2 recipe (runtime.baseline_bench --recipe 4/2m4);
 *   --mix q2_k     what llama-quantize's Q2_K gives an 8-expert model (src/llama-quant.cpp):
 *                  attn_q Q2_K, attn_k and attn_v Q8_0, attn_output Q5_K, ffn_gate/up Q2_K,
 *                  ffn_down Q3_K, output Q6_K, token_embd Q2_K.
 * Build (LL, B as in tools/ggml_expert_bench.c):
 *   gcc -O2 -march=native -fopenmp -I$LL/ggml/include tools/ggml_mixtral_gguf.c -o /tmp/ggml_mixtral_gguf \
 *       $B/ggml/src/libggml.a $B/ggml/src/libggml-cpu.a $B/ggml/src/libggml-base.a -lstdc++ -lm -lpthread
 * Run:
 *   /tmp/ggml_mixtral_gguf OUT.gguf [--layers 32] [--mix matched|q2_k]
 *   llama-bench -m OUT.gguf -t 2 -p 128 -n 16 -r 3 -o json
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "gguf.h"

enum { H = 4096, F = 14336, E = 8, HEADS = 32, KV = 8, HD = 128, VOCAB = 32000 };

static const char *out_path;  /* removed on failure: no partial file is left behind */

static void fail(const char *what) {
    fprintf(stderr, "ggml_mixtral_gguf: %s\n", what);
    if (out_path) remove(out_path);
    exit(1);
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static double uniform(void) {  /* xorshift64*: reproducible, no libc state */
    rng ^= rng >> 12, rng ^= rng << 25, rng ^= rng >> 27;
    return ((rng * 0x2545F4914F6CDD1Dull) >> 11) * (1.0 / 9007199254740992.0);
}
static float gaussian(void) {
    const double u = uniform() + 1e-300, v = uniform();
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

/* one matrix of `rows` x `cols` (ggml: ne0 = cols) in `type`, bytes cached per (type, rows, cols) */
typedef struct { enum ggml_type type; int64_t rows, cols; void *data; size_t nbytes; } matrix;
static matrix cache[16];
static int ncache;

static const matrix *quantized(enum ggml_type type, int64_t rows, int64_t cols, float value) {
    for (int i = 0; i < ncache; i++)
        if (cache[i].type == type && cache[i].rows == rows && cache[i].cols == cols) return &cache[i];
    if (ncache == 16) fail("too many matrix kinds");
    float *src = malloc((size_t)(rows * cols) * sizeof(float));
    const size_t nbytes = ggml_row_size(type, cols) * (size_t)rows;
    void *dst = malloc(nbytes);
    if (!src || !dst) fail("out of memory");
    for (int64_t i = 0; i < rows * cols; i++) src[i] = value != 0.0f ? value : 0.02f * gaussian();
    if (type == GGML_TYPE_F32) memcpy(dst, src, nbytes);
    else if (type == GGML_TYPE_F16) ggml_fp32_to_fp16_row(src, dst, rows * cols);
    else ggml_quantize_chunk(type, src, dst, 0, rows, cols, NULL);
    free(src);
    cache[ncache] = (matrix){type, rows, cols, dst, nbytes};
    return &cache[ncache++];
}

typedef struct { char name[64]; enum ggml_type type; int64_t ne[3]; int nd; float value; } spec;

int main(int argc, char **argv) {
    const char *out = NULL, *mix = "matched";
    int layers = 32;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--layers") && i + 1 < argc) layers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--mix") && i + 1 < argc) mix = argv[++i];
        else if (argv[i][0] != '-' && !out) out = argv[i];
        else { fprintf(stderr, "usage: %s OUT.gguf [--layers N] [--mix matched|q2_k]\n", argv[0]); return 2; }
    }
    const int shipped = !strcmp(mix, "q2_k");
    if (!out || layers < 1 || (!shipped && strcmp(mix, "matched"))) {
        fprintf(stderr, "usage: %s OUT.gguf [--layers N >= 1] [--mix matched|q2_k]\n", argv[0]);
        return 2;
    }
    const enum ggml_type q = shipped ? GGML_TYPE_Q2_K : GGML_TYPE_Q4_K, kv = shipped ? GGML_TYPE_Q8_0 : GGML_TYPE_Q4_K,
                         o = shipped ? GGML_TYPE_Q5_K : GGML_TYPE_Q4_K, down = shipped ? GGML_TYPE_Q3_K : GGML_TYPE_Q2_K,
                         head = shipped ? GGML_TYPE_Q6_K : GGML_TYPE_F16, embd = shipped ? GGML_TYPE_Q2_K : GGML_TYPE_F16;

    const int n = 3 + 10 * layers;  /* token_embd, output_norm, output; 10 per layer */
    spec *specs = calloc((size_t)n, sizeof(spec));
    if (!specs) fail("out of memory");
    int k = 0;
#define ADD(t, v, nd_, a, b, c, ...)                                                               \
    do {                                                                                            \
        snprintf(specs[k].name, sizeof specs[k].name, __VA_ARGS__);                                 \
        specs[k].type = (t), specs[k].value = (v), specs[k].nd = (nd_);                             \
        specs[k].ne[0] = (a), specs[k].ne[1] = (b), specs[k].ne[2] = (c), k++;                      \
    } while (0)
    ADD(embd, 0.0f, 2, H, VOCAB, 1, "token_embd.weight");
    for (int l = 0; l < layers; l++) {
        ADD(GGML_TYPE_F32, 1.0f, 1, H, 1, 1, "blk.%d.attn_norm.weight", l);
        ADD(q, 0.0f, 2, H, HEADS * HD, 1, "blk.%d.attn_q.weight", l);
        ADD(kv, 0.0f, 2, H, KV * HD, 1, "blk.%d.attn_k.weight", l);
        ADD(kv, 0.0f, 2, H, KV * HD, 1, "blk.%d.attn_v.weight", l);
        ADD(o, 0.0f, 2, HEADS * HD, H, 1, "blk.%d.attn_output.weight", l);
        ADD(GGML_TYPE_F32, 1.0f, 1, H, 1, 1, "blk.%d.ffn_norm.weight", l);
        ADD(GGML_TYPE_F32, 0.0f, 2, H, E, 1, "blk.%d.ffn_gate_inp.weight", l);
        ADD(GGML_TYPE_Q2_K, 0.0f, 3, H, F, E, "blk.%d.ffn_gate_exps.weight", l);
        ADD(GGML_TYPE_Q2_K, 0.0f, 3, H, F, E, "blk.%d.ffn_up_exps.weight", l);
        ADD(down, 0.0f, 3, F, H, E, "blk.%d.ffn_down_exps.weight", l);
    }
    ADD(GGML_TYPE_F32, 1.0f, 1, H, 1, 1, "output_norm.weight");
    ADD(head, 0.0f, 2, H, VOCAB, 1, "output.weight");
#undef ADD
    const int count = k;

    struct ggml_init_params ip = {(size_t)count * ggml_tensor_overhead(), NULL, true};
    struct ggml_context *ctx = ggml_init(ip);
    struct gguf_context *g = gguf_init_empty();
    if (!ctx || !g) fail("cannot set up ggml");
    gguf_set_val_str(g, "general.architecture", "llama");
    gguf_set_val_str(g, "general.name", "moe-pack synthetic Mixtral-8x7B shape");
    gguf_set_val_u32(g, "general.file_type", shipped ? 10u : 1u);  /* LLAMA_FTYPE_MOSTLY_Q2_K, else MOSTLY_F16 (mixed) */
    gguf_set_val_u32(g, "llama.context_length", 32768);
    gguf_set_val_u32(g, "llama.embedding_length", H);
    gguf_set_val_u32(g, "llama.block_count", (uint32_t)layers);
    gguf_set_val_u32(g, "llama.feed_forward_length", F);
    gguf_set_val_u32(g, "llama.rope.dimension_count", HD);
    gguf_set_val_u32(g, "llama.attention.head_count", HEADS);
    gguf_set_val_u32(g, "llama.attention.head_count_kv", KV);
    gguf_set_val_f32(g, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    gguf_set_val_f32(g, "llama.rope.freq_base", 1e6f);
    gguf_set_val_u32(g, "llama.expert_count", E);
    gguf_set_val_u32(g, "llama.expert_used_count", 2);
    gguf_set_val_u32(g, "llama.vocab_size", VOCAB);
    gguf_set_val_str(g, "tokenizer.ggml.model", "llama");
    char **tokens = malloc(VOCAB * sizeof(char *));
    float *scores = malloc(VOCAB * sizeof(float));
    int32_t *types = malloc(VOCAB * sizeof(int32_t));
    if (!tokens || !scores || !types) fail("out of memory");
    for (int t = 0; t < VOCAB; t++) {
        if (!(tokens[t] = malloc(16))) fail("out of memory");
        if (t < 3) strcpy(tokens[t], (const char *[]){"<unk>", "<s>", "</s>"}[t]), types[t] = t == 0 ? 2 : 3;
        else if (t < 259) snprintf(tokens[t], 16, "<0x%02X>", t - 3), types[t] = 6;  /* byte tokens */
        else snprintf(tokens[t], 16, "\xe2\x96\x81t%d", t), types[t] = 1;           /* "▁t<id>" */
        scores[t] = -(float)t;
    }
    gguf_set_arr_str(g, "tokenizer.ggml.tokens", (const char **)tokens, VOCAB);
    gguf_set_arr_data(g, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, scores, VOCAB);
    gguf_set_arr_data(g, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, VOCAB);
    gguf_set_val_u32(g, "tokenizer.ggml.unknown_token_id", 0);
    gguf_set_val_u32(g, "tokenizer.ggml.bos_token_id", 1);
    gguf_set_val_u32(g, "tokenizer.ggml.eos_token_id", 2);

    for (int i = 0; i < count; i++) {
        struct ggml_tensor *t = ggml_new_tensor(ctx, specs[i].type, specs[i].nd, specs[i].ne);
        ggml_set_name(t, specs[i].name);
        gguf_add_tensor(g, t);
    }
    out_path = out;
    if (!gguf_write_to_file(g, out, true)) fail("cannot write the header");
    FILE *f = fopen(out, "ab");
    if (!f) fail("cannot open the file to append the tensors");
    const size_t align = gguf_get_alignment(g);
    static const char zeros[256];
    if (align > sizeof zeros) fail("alignment above 256 bytes");
    size_t total = 0;
    for (int i = 0; i < count; i++) {
        const spec *s = &specs[i];
        const matrix *m = quantized(s->type, s->ne[1], s->ne[0], s->value);
        for (int64_t e = 0; e < s->ne[2]; e++)
            if (fwrite(m->data, 1, m->nbytes, f) != m->nbytes) fail("short write (disk full?)");
        const size_t bytes = m->nbytes * (size_t)s->ne[2], pad = (align - bytes % align) % align;
        if (bytes != gguf_get_tensor_size(g, i)) fail("a tensor's size differs from the header's");
        if (fwrite(zeros, 1, pad, f) != pad) fail("short write (disk full?)");
        total += bytes;
    }
    if (fclose(f)) fail("cannot close the file");
    printf("{\"file\": \"%s\", \"layers\": %d, \"mix\": \"%s\", \"tensor_bytes\": %zu, \"tensors\": %d}\n", out, layers,
           mix, total, count);
    return 0;
}
