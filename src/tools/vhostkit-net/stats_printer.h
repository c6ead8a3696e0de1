// --stats=SECONDS: one line per queue pair per interval with rates since the last line.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "vhostkit/net/net_device.h"

namespace vhostkit::cli {

// Formats the interval's delta of one queue pair: pps, Gbit/s, drops, errors, both directions.
std::string format_pair_line(std::uint16_t qp, const net::NetStats& prev, const net::NetStats& now,
                             double seconds);

class StatsPrinter {
 public:
  // Prints through `emit` every `interval` until destroyed.
  StatsPrinter(const net::NetDevice& dev, std::chrono::milliseconds interval,
               std::function<void(const std::string&)> emit);
  ~StatsPrinter();
  StatsPrinter(const StatsPrinter&) = delete;
  StatsPrinter& operator=(const StatsPrinter&) = delete;

 private:
  void run();

  const net::NetDevice& dev_;
  std::chrono::milliseconds interval_;
  std::function<void(const std::string&)> emit_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace vhostkit::cli
