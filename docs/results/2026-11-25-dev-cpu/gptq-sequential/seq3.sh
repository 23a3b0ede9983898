cd /tmp/imx; export PYTHONPATH=/tmp/exp
ppl() { for t in ref vim; do python -m runtime.perplexity $1 $t.txt --ctx 512 --max-tokens 4096 --device cpu --cpu-activations int16 2>&1 | tail -1 | sed "s|^|$1 $t: |"; done; }
for eb in 2 3 4; do
/usr/bin/time -f "q4$eb gptq true-seq %e s %M KB" moe-pack quantize smollm2-moe -o q4${eb}_tseq.moepack --expert-bits $eb --gptq calib.txt --device cpu -q
ppl q4${eb}_tseq.moepack
done
echo "demo: $(python -m runtime.generate q42_tseq.moepack --chat --prompt 'What is the capital of France?' --max-new-tokens 40 --expert-slots 90 --device cpu 2>&1 | tail -2 | head -1)"
echo DONE
