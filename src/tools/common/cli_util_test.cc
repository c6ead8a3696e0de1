#include "cli_util.h"

#include <gtest/gtest.h>

namespace vhostkit::cli {
namespace {

TEST(CpuList, SinglesAndRanges) {
  auto r = parse_cpu_list("1-3,0,6");
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(*r, (std::vector<int>{1, 2, 3, 0, 6}));
}

TEST(CpuList, RejectsGarbageDuplicatesAndBackwardRanges) {
  EXPECT_FALSE(parse_cpu_list(""));
  EXPECT_FALSE(parse_cpu_list("a"));
  EXPECT_FALSE(parse_cpu_list("1,,2"));
  EXPECT_FALSE(parse_cpu_list("3-1"));
  EXPECT_FALSE(parse_cpu_list("1,1"));
  EXPECT_FALSE(parse_cpu_list("-1"));
  EXPECT_FALSE(parse_cpu_list("99999"));
}

TEST(Mac, ParsesAndFormats) {
  auto m = parse_mac("52:54:00:AB:cd:0f");
  ASSERT_TRUE(m);
  EXPECT_EQ(format_mac(*m), "52:54:00:ab:cd:0f");
  EXPECT_TRUE(parse_mac("02-00-00-00-00-01"));
}

TEST(Mac, RejectsMalformedAndMulticast) {
  EXPECT_FALSE(parse_mac("52:54:00:12:34"));
  EXPECT_FALSE(parse_mac("52:54:00:12:34:5g"));
  EXPECT_FALSE(parse_mac("52:54:00:12:34:567"));
  EXPECT_FALSE(parse_mac("01:00:5e:00:00:01"));
}

TEST(LogLevel, KnownLevelsOnly) {
  EXPECT_TRUE(set_log_level("debug"));
  EXPECT_TRUE(set_log_level("off"));
  EXPECT_FALSE(set_log_level("loud"));
  EXPECT_TRUE(set_log_level("info"));
}

}  // namespace
}  // namespace vhostkit::cli
