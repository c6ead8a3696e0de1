// --stats=SECONDS for vhostkit-net: one line per queue pair per interval with the interval's
// rates.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "backend_program.h"
#include "vhostkit/net/net_device.h"

namespace vhostkit::cli {

// Formats the interval's delta of one queue pair: pps, Gbit/s, drops, errors, both directions.
std::string format_pair_line(std::uint16_t qp, const net::NetStats& prev, const net::NetStats& now,
                             double seconds);

// Formats one queue pair's totals since start: frames, bytes, drops, errors, both directions.
std::string format_pair_totals(std::uint16_t qp, const net::NetStats& total);

class StatsPrinter {
 public:
  // Prints through `emit` every `interval` until destroyed.
  StatsPrinter(const net::NetDevice& dev, std::chrono::milliseconds interval,
               std::function<void(const std::string&)> emit);

 private:
  static std::vector<net::NetStats> init(const net::NetDevice& dev);
  void tick(double seconds);

  const net::NetDevice& dev_;
  std::function<void(const std::string&)> emit_;
  std::vector<net::NetStats> prev_;
  Ticker ticker_;  // last: starts after everything it reads is ready
};

}  // namespace vhostkit::cli
