// Package stream fans live events out to many server-sent-events (SSE) clients.
//
// It owns the set of connected clients, each client's bounded buffer and the
// policy for a slow one: Publish never blocks, and a client whose buffer is full
// is dropped (its connection closed, counted) so that it can stall neither the
// publisher nor any other client. A client reconnects by itself (the browser's
// EventSource does) and gets a fresh snapshot.
//
// It must not know what the events mean: callers give it ready-encoded data and
// a topic to filter on; authentication and rate limits are the caller's.
package stream
