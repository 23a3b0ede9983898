set -e
cd /tmp/imx
ppl() { for t in ref vim; do python -m runtime.perplexity $1 $t.txt --ctx 512 --max-tokens 4096 --device cpu --cpu-activations int16 2>&1 | tail -1 | sed "s|^|$1 $t: |"; done; }
/usr/bin/time -f "imatrix from checkpoint %e s %M KB" moe-pack imatrix smollm2-moe calib.txt -o ckpt.imatrix --device cpu -q
/usr/bin/time -f "q42 imatrix(ckpt) %e s" moe-pack quantize smollm2-moe -o q42_imck.moepack --imatrix ckpt.imatrix --device cpu -q
ppl q42_imck.moepack
/usr/bin/time -f "q43 imatrix(ckpt) %e s" moe-pack quantize smollm2-moe -o q43_imck.moepack --attn-bits 4 --expert-bits 3 --imatrix ckpt.imatrix --device cpu -q
ppl q43_imck.moepack
echo DONE
