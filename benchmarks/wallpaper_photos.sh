#!/usr/bin/env bash
# The extra training photographs of the shipped tiny-64 model (src/msdd/pretrained/README.md lists them
# with their licences): 14 photographs from three Debian wallpaper packages, extracted into OUT_DIR.
# Train on them beside the embedded photos with --set data.source=embedded+OUT_DIR.
#   bash benchmarks/wallpaper_photos.sh [OUT_DIR]      (default: wallpaper-photos; needs apt, ~130 MB download)
set -euo pipefail
OUT=${1:-wallpaper-photos}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && apt-get download plasma-workspace-wallpapers ukui-wallpapers lomiri-wallpapers-20.04 >/dev/null)
for deb in "$TMP"/*.deb; do dpkg-deb -x "$deb" "$TMP/x"; done
mkdir -p "$OUT"
W="$TMP/x/usr/share/wallpapers"
for name in BytheWater ColdRipple ColorfulCups DarkestHour EveningGlow FallenLeaf Grey Kite OneStandsOut Path \
            Volna summer_1am; do
  big=$(ls -S "$W/$name/contents/images/"* | head -1)   # the largest rendition of each
  cp "$big" "$OUT/plasma-$name.${big##*.}"
done
for f in Infinite-Sea_by_Aury88.jpg Kleiber_by_Lukas_Baubkus.jpg; do
  cp "$TMP/x/usr/share/backgrounds/$f" "$OUT/lomiri-$f"
done
ls "$OUT" | wc -l
