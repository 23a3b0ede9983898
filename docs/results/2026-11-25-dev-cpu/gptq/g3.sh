cd /tmp/imx
ppl() { for t in ref vim; do python -m runtime.perplexity $1 $t.txt --ctx 512 --max-tokens 4096 --device cpu --cpu-activations int16 2>&1 | tail -1 | sed "s|^|$1 $t: |"; done; }
/usr/bin/time -f "q43 gptq %e s %M KB" moe-pack quantize smollm2-moe -o q43_gptq.moepack --attn-bits 4 --expert-bits 3 --gptq calib.txt --device cpu -q
ppl q43_gptq.moepack
/usr/bin/time -f "q44 gptq %e s %M KB" moe-pack quantize smollm2-moe -o q44_gptq.moepack --attn-bits 4 --expert-bits 4 --gptq calib.txt --device cpu -q
ppl q44_gptq.moepack
echo DONE
