/* Tiny assertion helpers for the C ABI tests (C11, dsd.h only). */
#ifndef DSD_TEST_CHECK_H
#define DSD_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsd/dsd.h"

static int check_failures = 0;

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      check_failures++;                                                      \
    }                                                                        \
  } while (0)

/* Runs a call that must succeed; prints the error otherwise. Each call gets its own error
 * object, NULL on entry as the ABI requires. */
#define CHECK_OK(call)                                                               \
  do {                                                                               \
    dsd_error* check_err_ = NULL;                                                    \
    dsd_status check_st_ = (call_with_err_ = &check_err_, call);                     \
    if (check_st_ != DSD_OK) {                                                       \
      fprintf(stderr, "%s:%d: %s failed: %s (%s)\n", __FILE__, __LINE__, #call,       \
              dsd_status_name(check_st_), dsd_error_message(check_err_));             \
      check_failures++;                                                              \
    }                                                                                \
    dsd_error_free(check_err_);                                                      \
  } while (0)

/* Expects a status, and a message containing `needle` (NULL: any message, but not empty). */
static dsd_error** call_with_err_;
static void expect_error(const char* file, int line, const char* what, dsd_status got,
                         dsd_error* err, dsd_status want, const char* needle) {
  if (got != want) {
    fprintf(stderr, "%s:%d: %s returned %s, expected %s (%s)\n", file, line, what,
            dsd_status_name(got), dsd_status_name(want), dsd_error_message(err));
    check_failures++;
  } else if (err == NULL || dsd_error_code(err) != want) {
    fprintf(stderr, "%s:%d: %s: no error object with the status\n", file, line, what);
    check_failures++;
  } else if (dsd_error_message(err)[0] == '\0' ||
             (needle != NULL && strstr(dsd_error_message(err), needle) == NULL)) {
    fprintf(stderr, "%s:%d: %s: message '%s' lacks '%s'\n", file, line, what,
            dsd_error_message(err), needle ? needle : "(anything)");
    check_failures++;
  }
  dsd_error_free(err);
}

#define EXPECT_ERROR(want, needle, call)                                             \
  do {                                                                               \
    dsd_error* check_err_ = NULL;                                                    \
    dsd_status check_st_ = (call_with_err_ = &check_err_, call);                     \
    expect_error(__FILE__, __LINE__, #call, check_st_, check_err_, want, needle);    \
  } while (0)

/* The error out-parameter of the call being checked. */
#define ERR call_with_err_

#define CHECK_DONE()                                                   \
  do {                                                                 \
    if (check_failures != 0) {                                         \
      fprintf(stderr, "%d check(s) failed\n", check_failures);         \
      return 1;                                                        \
    }                                                                  \
    printf("all checks passed\n");                                     \
    return 0;                                                          \
  } while (0)

#endif
