package httpapi

import (
	"fmt"
	"net/http"
)

// LimitBody refuses a request whose body is larger than max bytes: at once
// with 413 when its Content-Length says so (nothing is read), otherwise the
// body reader fails at the limit and the connection is closed after the answer
// (http.MaxBytesReader).
func LimitBody(max int64, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength > max {
			w.Header().Set("Connection", "close")
			http.Error(w, fmt.Sprintf("request body of %d bytes is over the limit of %d bytes for %s", r.ContentLength, max, r.URL.Path),
				http.StatusRequestEntityTooLarge)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, max)
		next.ServeHTTP(w, r)
	})
}
