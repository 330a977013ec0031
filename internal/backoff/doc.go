// Package backoff owns retry pacing: an exponential backoff with jitter and a
// sleep that ends when its context is done.
//
// It must not decide what is retried, which errors are permanent or when to
// give up: callers own that and ask only how long to wait.
package backoff
