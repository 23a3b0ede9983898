cd /tmp/imx
ppl() { for t in ref vim; do python -m runtime.perplexity $1 $t.txt --ctx 512 --max-tokens 4096 --device cpu --cpu-activations int16 2>&1 | tail -1 | sed "s|^|$1 $t: |"; done; }
/usr/bin/time -f "q42 gptq seq %e s %M KB" moe-pack quantize smollm2-moe -o q42_gseq.moepack --gptq calib.txt --device cpu -q
ppl q42_gseq.moepack
echo DONE
