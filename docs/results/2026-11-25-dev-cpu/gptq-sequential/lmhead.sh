cd /tmp/imx
ppl() { for t in ref vim; do python -m runtime.perplexity $1 $t.txt --ctx 512 --max-tokens 4096 --device cpu --cpu-activations int16 2>&1 | tail -1 | sed "s|^|$1 $t: |"; done; }
for lm in 4 3; do
  PYTHONPATH=/tmp/exp2 /usr/bin/time -f "lm$lm new %e s %M KB" moe-pack quantize smol-untied -o lm${lm}_new.moepack --attn-bits 4 --expert-bits 16 --lm-head-bits $lm --gptq calib.txt --device cpu -q
  PYTHONPATH=/tmp/exp /usr/bin/time -f "lm$lm old %e s %M KB" moe-pack quantize smol-untied -o lm${lm}_old.moepack --attn-bits 4 --expert-bits 16 --lm-head-bits $lm --gptq calib.txt --device cpu -q
done
PYTHONPATH=/tmp/exp2 moe-pack quantize smol-untied -o lm16.moepack --attn-bits 4 --expert-bits 16 --gptq calib.txt --device cpu -q
export PYTHONPATH=/tmp/exp2
for f in lm16 lm4_old lm4_new lm3_old lm3_new; do ppl $f.moepack; done
echo DONE
