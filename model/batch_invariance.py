"""Answers that do not depend on who else is being answered: the engine asks this machine's kernels, at load,
which ways of batching rows leave every row's result unchanged, instead of assuming a rounding property.

A matrix product's kernel may round a row differently depending on how many rows it is given and where the row
sits: it picks a kernel and a blocking by the row count. What was measured (27M shapes, torch 2.13):
  - AMD EPYC with AVX512-BF16: fp32 (MKL) rounds one row alone differently from rows in blocks of 4; bf16
    (oneDNN) rounds alike for any count;
  - Intel Xeon with AMX: fp32 rows round alike only in calls of 16 or 32 rows, and not at all for some shapes;
    bf16 rounds alike below ~50 rows and differently above (AMX tiles); int8 weight-only products (model/quant.py)
    compute each row on its own and round alike for any count.
Each of these is checked here on random rows, for the model's own matrices, on the machine the engine runs on:

  decode_row_block   for a decoding step of up to max_rows requests: the smallest R such that any multiple of R
                     rows, up to max_rows padded, gives each row the bits it gets in a call of R rows, wherever it
                     sits (the step pads its batch to a multiple of R); None when no R does (each row then
                     gets its own call: one row per call is trivially independent of the others)
  shared_prefill_rows  whether prompts may share a prefill pass, and up to how many rows
  encode_pass        whether requests' images may share an encode pass, and of what size
A kernel's choice depends on the shapes, dtypes and row count, not on the values, so random rows answer it.
"""
import torch

PREFILL_ROW_COUNTS = (1, 2, 3, 5, 8, 13, 16, 31, 50, 64, 100, 128, 200, 256)  # a shared prefill holds <= 256 rows


@torch.inference_mode()
def rows_alike(product, x, row_counts) -> bool:
    """True when every row of product(x[:M]) (rows: x's leading dimension), for every M in row_counts, has the
    bits it gets in a call of R = row_counts[0] rows, whatever its place among them. The counts are multiples
    of R; x holds max(row_counts) rows."""
    r = row_counts[0]
    ref = torch.cat([product(x[j:j + r]) for j in range(0, max(row_counts), r)])  # each row among R
    if r > 1 and not torch.equal(product(x[:r].roll(1, 0)).roll(-1, 0), ref[:r]):  # its place among them
        return False
    return all(torch.equal(product(x[:m]), ref[:m]) for m in row_counts if m != r)


def random_rows(n, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)


def distinct_products(linears):
    """One module per distinct (class, in_features, out_features, weight dtype): kernels are chosen by shape."""
    seen = {}
    for lin in linears:
        w = getattr(lin, "weight", None)
        key = (type(lin), lin.in_features, lin.out_features, None if w is None else w.dtype)
        seen.setdefault(key, lin)
    return list(seen.values())


def decode_row_block(linears, max_rows: int, dtype, device="cpu", candidates=(1, 2, 4, 8)):
    """The row block R for a decoding step over up to max_rows requests (see the module docstring), or None."""
    products = distinct_products(linears)
    for r in candidates:
        counts = list(range(r, -(-max_rows // r) * r + 1, r))
        if all(rows_alike(p, random_rows(counts[-1], p.in_features, dtype=dtype, device=device), counts)
               for p in products):
            return r
    return None


def shared_prefill_rows(linears, dtype, device="cpu", row_counts=PREFILL_ROW_COUNTS) -> int:
    """How many rows a prefill may put in one pass and still give each prompt its solo result: the largest of
    row_counts when every product rounds alike over all of them, else 0 (each prompt alone)."""
    ok = all(rows_alike(p, random_rows(max(row_counts), p.in_features, dtype=dtype, device=device), row_counts)
             for p in distinct_products(linears))
    return max(row_counts) if ok else 0


def encode_pass(encode, n_images: int):
    """How requests' images may share the image encoder's passes: (n_images, False) when encode((n, 3, 224, 224)
    pixels) gives each image the same features in batches of any size up to n_images; else (n_images, True) when
    it does so in passes of exactly n_images (a lone image is then padded to them); else (1, False): each
    request's images in a pass of their own."""
    pixels = random_rows(n_images, 3, 224, 224)
    if rows_alike(encode, pixels, list(range(1, n_images + 1))):
        return n_images, False
    if rows_alike(encode, pixels, [n_images]):
        return n_images, True
    return 1, False
