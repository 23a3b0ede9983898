cd /tmp/imx
ppl() { for t in ref vim; do python -m runtime.perplexity $1 $t.txt --ctx 512 --max-tokens 4096 --device cpu --cpu-activations int16 2>&1 | tail -1 | sed "s|^|$1 $t: |"; done; }
/usr/bin/time -f "q42 gptq seq 16k %e s %M KB" moe-pack quantize smollm2-moe -o q42_g16k.moepack --gptq calib.txt --gptq-tokens 16384 --device cpu -q
ppl q42_g16k.moepack
echo "demo: $(python -m runtime.generate q42_g16k.moepack --chat --prompt 'What is the capital of France?' --max-new-tokens 40 --expert-slots 90 --device cpu 2>&1 | tail -2 | head -1)"
echo DONE
