// What one benchmark run produced, and the ways it is written out: the CSV row bench/run.sh
// collects, the summary table a person reads, the JSON a script parses. Pure functions, tested.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "vhostkit/error.h"

namespace vhostkit::bench {

enum class Mode : std::uint8_t { txonly, rxonly, loop, fwd, latency, blk };

std::string_view to_string(Mode m) noexcept;
Result<Mode> parse_mode(std::string_view s);
constexpr bool is_net(Mode m) noexcept { return m != Mode::blk; }
// Modes whose frames come back from a reflecting back-end: what is sent and not received is lost.
constexpr bool reflects(Mode m) noexcept {
  return m == Mode::loop || m == Mode::fwd || m == Mode::latency;
}

// Options that make sense for one family of modes only. check_mode_options fails (one line,
// naming the option and the mode) when `given` holds one of the other family's.
inline constexpr std::string_view kNetOnlyOptions[] = {"--size", "--burst", "--buffer-size",
                                                       "--reply-timeout"};
inline constexpr std::string_view kBlkOnlyOptions[] = {"--rw", "--iodepth", "--bs"};
Result<> check_mode_options(Mode m, const std::vector<std::string>& given);

// blk mode: what each request does.
enum class BlkRw : std::uint8_t { randread, randwrite };
std::string_view to_string(BlkRw rw) noexcept;
Result<BlkRw> parse_rw(std::string_view s);
// --bs: a multiple of 512 in 512..max.
Result<> check_bs(std::uint32_t bs, std::uint32_t max);

// "64" or "64,256,1518": frame lengths (bytes handed to the device, virtio-net header and CRC
// not included, as testpmd's --txpkts), each in [min, max], at least one.
Result<std::vector<std::uint32_t>> parse_sizes(std::string_view s, std::uint32_t min,
                                               std::uint32_t max);

// The ring layout and IN_ORDER as the back-end agreed to them, against what --ring and
// --in-order asked for: one line per difference (for stderr), none when everything was granted;
// with `strict`, the first difference as an error instead.
Result<std::vector<std::string>> check_negotiated(std::string_view asked_ring, bool asked_in_order,
                                                  std::string_view got_ring, bool got_in_order,
                                                  bool strict);

struct RunResult {
  std::string label;  // --label: names the configuration in the CSV
  Mode mode = Mode::loop;
  std::uint32_t size = 0;      // frame bytes
  std::string poll;            // event | busy
  std::string ring = "split";  // the negotiated layout: split | packed
  bool in_order = false;       // VIRTIO_F_IN_ORDER negotiated
  std::uint32_t burst = 0;
  std::uint16_t queues = 1;
  double seconds = 0;  // length of the measured window
  // Totals over the whole run (warm-up and drain included): what drops is computed from.
  std::uint64_t tx = 0;
  std::uint64_t rx = 0;
  std::uint64_t drops = 0;  // loop/latency: tx - rx after the drain; 0 for txonly/rxonly
  // Rates inside the measured window.
  double tx_pps = 0;
  double rx_pps = 0;
  // latency only, microseconds
  std::uint64_t samples = 0;
  double p50_us = 0, p99_us = 0, p999_us = 0, min_us = 0, max_us = 0, mean_us = 0;

  // The headline rate: what the mode measures (tx for txonly, rx otherwise: for loop, frames
  // that made the round trip; for latency, round trips per second).
  double pps() const noexcept { return mode == Mode::txonly ? tx_pps : rx_pps; }
  // Frame bits only (no preamble, CRC or inter-frame gap), as testpmd's sizes.
  double gbps() const noexcept { return pps() * size * 8.0 / 1e9; }
};

// One blk run: IOPS and latency (submit -> used) of `queues` x `iodepth` requests in flight.
struct BlkResult {
  std::string label;
  BlkRw rw = BlkRw::randread;
  std::uint32_t bs = 4096;
  std::uint16_t iodepth = 1;
  std::uint16_t queues = 1;
  std::string poll;
  std::string ring = "split";  // the negotiated layout: split | packed
  bool in_order = false;       // VIRTIO_F_IN_ORDER negotiated
  double seconds = 0;          // measured window
  std::uint64_t requests = 0;  // completed inside the measured window
  std::uint64_t total = 0;     // completed over the whole run (warm-up and drain included)
  std::uint64_t errors = 0;    // whole run: completed with a status other than OK
  double iops = 0;
  std::uint64_t samples = 0;
  double p50_us = 0, p99_us = 0, p999_us = 0, min_us = 0, max_us = 0, mean_us = 0;

  double mb_per_s() const noexcept { return iops * bs / 1e6; }  // MB = 10^6 bytes
};

std::string blk_csv_header();
std::string blk_csv_row(const BlkResult& r, std::string_view utc);
Result<> append_blk_csv(const std::string& path, const std::vector<BlkResult>& results,
                        std::string_view utc);
nlohmann::json to_json(const BlkResult& r);
std::string format_blk_table(const std::vector<BlkResult>& results);
// The live line: IOPS and MB/s over the last interval, errors so far.
std::string format_blk_live(double t, double iops, std::uint32_t bs, std::uint64_t errors);

std::string csv_header();
std::string csv_row(const RunResult& r, std::string_view utc);
// Appends one row per result to `path`, writing the header first if the file is new or empty.
Result<> append_csv(const std::string& path, const std::vector<RunResult>& results,
                    std::string_view utc);

nlohmann::json to_json(const RunResult& r);
// Fixed-width, one line per result under a header line; every line the same width.
std::string format_table(const std::vector<RunResult>& results);
// The live line printed each second: rates over the interval and drops so far.
std::string format_live(double t, double tx_pps, double rx_pps, std::uint32_t size,
                        std::uint64_t lost);

}  // namespace vhostkit::bench
