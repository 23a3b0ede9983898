cd /tmp/imx
ppl() { for t in ref vim; do python -m runtime.perplexity $1 $t.txt --ctx 512 --max-tokens 4096 --device cpu --cpu-activations int16 2>&1 | tail -1 | sed "s|^|$1 $t: |"; done; }
/usr/bin/time -f "q42 gptq final %e s %M KB" moe-pack quantize smollm2-moe -o q42_final.moepack --gptq calib.txt --device cpu -q
ppl q42_final.moepack
echo "demo: $(python -m runtime.generate q42_final.moepack --chat --prompt 'What is the capital of France?' --max-new-tokens 40 --expert-slots 90 --device cpu 2>&1 | tail -2 | head -1)"
echo DONE
