cd /tmp/imx; export PYTHONPATH=/tmp/exp
while pgrep -f seq3.sh >/dev/null; do sleep 10; done
for f in q42_final q42_tseq q43_gptq q43_tseq; do for t in ref vim; do python -m runtime.perplexity $f.moepack $t.txt --ctx 512 --max-tokens 16384 --device cpu --cpu-activations int16 2>&1 | tail -1 | sed "s|^|$f $t: |"; done; done
echo DONE
