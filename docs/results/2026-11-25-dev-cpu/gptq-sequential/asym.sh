cd /tmp/imx; export PYTHONPATH=/tmp/asym
/usr/bin/time -f "q42 asym %e s %M KB" moe-pack quantize smollm2-moe -o q42_asym.moepack --expert-bits 2 --gptq calib.txt --device cpu -q
for t in ref vim; do python -m runtime.perplexity q42_asym.moepack $t.txt --ctx 512 --max-tokens 16384 --device cpu --cpu-activations int16 2>&1 | tail -1 | sed "s|^|q42_asym $t: |"; done
echo DONE
