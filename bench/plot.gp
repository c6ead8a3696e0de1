# Plots from a bench/run.sh results CSV:
#   gnuplot -e "csv='bench/results/latest.csv'; outdir='docs'" bench/plot.gp
# writes outdir/perf_throughput.png (Mpps and Gbit/s vs frame size, one line per configuration)
# and outdir/perf_latency.png (p50 and p99 round trip per latency configuration).
# Columns: 1 utc, 2 section, 3 config, 4 name, 5 mode, 6 size, 7 poll, 8 mpps, 9 gbps, 10 ratio,
#          11 p50_us, 12 p99_us, 13 p999_us, 14 drops, 15 value, 16 unit
if (!exists("csv")) csv = 'bench/results/latest.csv'
if (!exists("outdir")) outdir = 'docs'
set datafile separator ','
set datafile missing ''
set terminal pngcairo size 1100,480 font 'sans,10' noenhanced
set key top right
set grid

is(sec, cfg) = (strcol(2) eq sec && strcol(3) eq cfg)

set output outdir.'/perf_throughput.png'
set multiplot layout 1,2 title 'vhost-user throughput, one queue pair, one core per side (loop through a MAC-swapping back-end)'
set xlabel 'frame size (bytes)'
set ylabel 'Mpps'
set xrange [0:1600]
set yrange [0:*]
set xtics (64, 256, 512, 1024, 1518)
plot for [c in 'c1 c2 c3 c4'] csv using (is('throughput', c) ? $6 : NaN):(is('throughput', c) ? $8 : NaN) \
     with linespoints lw 2 pt 7 title c.': '.(c eq 'c1' ? 'testpmd virtio-user <-> testpmd vhost' : \
       c eq 'c2' ? 'testpmd virtio-user <-> vhostkit-net' : \
       c eq 'c3' ? 'vhostkit-bench <-> testpmd vhost' : 'vhostkit-bench <-> vhostkit-net')
set ylabel 'Gbit/s'
set key top left
plot for [c in 'c1 c2 c3 c4'] csv using (is('throughput', c) ? $6 : NaN):(is('throughput', c) ? $9 : NaN) \
     with linespoints lw 2 pt 7 title c
unset multiplot

set output outdir.'/perf_latency.png'
set terminal pngcairo size 900,480 font 'sans,10' noenhanced
set title 'round trip, 64 B, one frame in flight (vhostkit-bench latency)'
unset xlabel
set ylabel 'microseconds (log)'
set logscale y
set xrange [*:*]
set yrange [*:*]
set offsets 0.5, 0.5, 0, 0
unset xtics
set yrange [0.5:*]
set style fill solid 0.8 border -1
set key top left
lat(col) = strcol(2) eq 'latency' ? column(col) : NaN
plot i = 0, csv using (strcol(2) eq 'latency' ? (i = i + 1, i - 0.2) : NaN):(lat(11)):(0.4) with boxes title 'p50', \
     j = 0, csv using (strcol(2) eq 'latency' ? (j = j + 1, j + 0.2) : NaN):(lat(12)):(0.4) with boxes title 'p99', \
     k = 0, csv using (strcol(2) eq 'latency' ? (k = k + 1, k) : NaN):(lat(12)):(strcol(3).' / '.strcol(7).' poll') with labels offset 0,1 notitle
