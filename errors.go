package micro

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
)

// Code is an RPC status code: one of the sixteen codes shared by Connect and
// gRPC (https://connectrpc.com/docs/protocol#error-codes). There is no code for
// success; a nil error means success.
type Code uint32

// The sixteen error codes, numbered as gRPC numbers them.
const (
	CodeCanceled           Code = 1  // the caller canceled the call
	CodeUnknown            Code = 2  // an error with no better code
	CodeInvalidArgument    Code = 3  // the request is malformed, whatever the system's state
	CodeDeadlineExceeded   Code = 4  // the deadline passed before the call finished
	CodeNotFound           Code = 5  // a requested entity does not exist
	CodeAlreadyExists      Code = 6  // the entity to create exists already
	CodePermissionDenied   Code = 7  // the caller is known but may not do this
	CodeResourceExhausted  Code = 8  // a quota or limit (such as the body size) was hit
	CodeFailedPrecondition Code = 9  // the system is not in a state for this call
	CodeAborted            Code = 10 // a concurrency conflict; retry at a higher level
	CodeOutOfRange         Code = 11 // past the valid range (such as reading past the end)
	CodeUnimplemented      Code = 12 // the endpoint does not exist or is not supported
	CodeInternal           Code = 13 // an invariant broke inside the server
	CodeUnavailable        Code = 14 // try again later, possibly on another node
	CodeDataLoss           Code = 15 // unrecoverable loss or corruption of data
	CodeUnauthenticated    Code = 16 // the caller has no valid credentials
)

var errorCodeNames = [...]string{
	CodeCanceled:           "canceled",
	CodeUnknown:            "unknown",
	CodeInvalidArgument:    "invalid_argument",
	CodeDeadlineExceeded:   "deadline_exceeded",
	CodeNotFound:           "not_found",
	CodeAlreadyExists:      "already_exists",
	CodePermissionDenied:   "permission_denied",
	CodeResourceExhausted:  "resource_exhausted",
	CodeFailedPrecondition: "failed_precondition",
	CodeAborted:            "aborted",
	CodeOutOfRange:         "out_of_range",
	CodeUnimplemented:      "unimplemented",
	CodeInternal:           "internal",
	CodeUnavailable:        "unavailable",
	CodeDataLoss:           "data_loss",
	CodeUnauthenticated:    "unauthenticated",
}

// errorCodeStatus is Connect's code → HTTP status table.
var errorCodeStatus = [...]int{
	CodeCanceled:           499,
	CodeUnknown:            http.StatusInternalServerError,
	CodeInvalidArgument:    http.StatusBadRequest,
	CodeDeadlineExceeded:   http.StatusGatewayTimeout,
	CodeNotFound:           http.StatusNotFound,
	CodeAlreadyExists:      http.StatusConflict,
	CodePermissionDenied:   http.StatusForbidden,
	CodeResourceExhausted:  http.StatusTooManyRequests,
	CodeFailedPrecondition: http.StatusBadRequest,
	CodeAborted:            http.StatusConflict,
	CodeOutOfRange:         http.StatusBadRequest,
	CodeUnimplemented:      http.StatusNotImplemented,
	CodeInternal:           http.StatusInternalServerError,
	CodeUnavailable:        http.StatusServiceUnavailable,
	CodeDataLoss:           http.StatusInternalServerError,
	CodeUnauthenticated:    http.StatusUnauthorized,
}

// String returns the code's Connect name ("not_found"), or "code_N" for a code
// outside the sixteen.
func (c Code) String() string {
	if c > 0 && int(c) < len(errorCodeNames) {
		return errorCodeNames[c]
	}
	return "code_" + strconv.FormatUint(uint64(c), 10)
}

// HTTPStatus returns the HTTP status Connect uses for the code (500 for a code
// outside the sixteen).
func (c Code) HTTPStatus() int {
	if c > 0 && int(c) < len(errorCodeStatus) {
		return errorCodeStatus[c]
	}
	return http.StatusInternalServerError
}

// MarshalText writes the code's Connect name.
func (c Code) MarshalText() ([]byte, error) { return []byte(c.String()), nil }

// UnmarshalText reads a Connect code name, or the "code_N" form String
// gives a code outside the sixteen; anything else is an error.
func (c *Code) UnmarshalText(b []byte) error {
	if code, ok := ParseCode(string(b)); ok {
		*c = code
		return nil
	}
	if n, ok := strings.CutPrefix(string(b), "code_"); ok {
		if v, err := strconv.ParseUint(n, 10, 32); err == nil {
			*c = Code(v)
			return nil
		}
	}
	return fmt.Errorf("micro: unknown error code %q", b)
}

// ParseCode returns the code with the Connect name s ("not_found").
func ParseCode(s string) (Code, bool) {
	for c, name := range errorCodeNames {
		if c > 0 && name == s {
			return Code(c), true
		}
	}
	return 0, false
}

// errorCodeFromHTTP maps the status of an HTTP response that carries no Connect
// error body to a code, as the Connect protocol specifies for clients.
func errorCodeFromHTTP(status int) Code {
	switch status {
	case http.StatusBadRequest:
		return CodeInternal
	case http.StatusUnauthorized:
		return CodeUnauthenticated
	case http.StatusForbidden:
		return CodePermissionDenied
	case http.StatusNotFound:
		return CodeUnimplemented
	case http.StatusTooManyRequests, http.StatusBadGateway,
		http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return CodeUnavailable
	}
	return CodeUnknown
}

// Error is the error of an RPC: a code, a message, and optional details and
// metadata. Every error that crosses the wire is an *Error; a handler that
// returns any other error is reported to the caller as [CodeUnknown] with the
// error's text (context errors map to [CodeCanceled] and
// [CodeDeadlineExceeded]).
//
// The message reaches the caller: put nothing secret in it.
type Error struct {
	// Code is the error's code; zero is read as CodeUnknown.
	Code Code
	// Message is the human-readable text sent to the caller.
	Message string
	// Details are typed payloads sent with the error, as Connect's
	// google.protobuf.Any details (a type name and binary value).
	Details []ErrorDetail
	// Meta is metadata sent with the error as response headers. On the
	// client, it holds the headers of the error response.
	Meta MD

	cause error // kept on this side of the wire only
	retry bool  // the call was not served: another node may take it
}

// ErrorDetail is one typed payload of an [Error]: Type names the message type
// ("google.rpc.RetryInfo"), Value holds its binary encoding.
type ErrorDetail struct {
	Type  string
	Value []byte
}

// NewError returns an *Error with the code and message.
func NewError(code Code, message string) *Error {
	return &Error{Code: code, Message: message}
}

// Errorf returns an *Error with the code and a formatted message. A %w verb
// wraps its argument: errors.Is and errors.As see it on this side of the wire,
// and only the text crosses it.
func Errorf(code Code, format string, args ...any) *Error {
	err := fmt.Errorf(format, args...)
	e := &Error{Code: code, Message: err.Error()}
	switch err.(type) {
	case interface{ Unwrap() error }, interface{ Unwrap() []error }: // one %w or several
		e.cause = err
	}
	return e
}

// Error returns "code: message".
func (e *Error) Error() string {
	if e == nil {
		return "<nil *micro.Error>"
	}
	if e.Message == "" {
		return e.code().String()
	}
	return e.code().String() + ": " + e.Message
}

// Unwrap returns what [Errorf] wrapped with %w, if anything.
func (e *Error) Unwrap() error {
	if e == nil {
		return nil
	}
	return e.cause
}

// code returns the code, reading zero (and a nil *Error) as CodeUnknown.
func (e *Error) code() Code {
	if e == nil || e.Code == 0 {
		return CodeUnknown
	}
	return e.Code
}

// CodeOf returns the code of err: the code of the first *Error in its chain,
// CodeCanceled or CodeDeadlineExceeded for context errors, CodeUnknown for any
// other error, and 0 for nil.
func CodeOf(err error) Code {
	if err == nil {
		return 0
	}
	var e *Error
	if errors.As(err, &e) {
		return e.code()
	}
	switch {
	case errors.Is(err, context.Canceled):
		return CodeCanceled
	case errors.Is(err, context.DeadlineExceeded):
		return CodeDeadlineExceeded
	}
	return CodeUnknown
}

// AsError returns err as an *Error: itself if it is one (or wraps one),
// otherwise a new *Error with [CodeOf] err and its text, wrapping it.
func AsError(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		if e == nil { // a typed nil returned as an error
			return &Error{Code: CodeUnknown, Message: "nil *micro.Error returned as an error"}
		}
		return e
	}
	return &Error{Code: CodeOf(err), Message: err.Error(), cause: err}
}

// Sentinel errors, checked with errors.Is.
var (
	// ErrClosed is returned by a component used after Close.
	ErrClosed = errors.New("micro: closed")
	// ErrNotFound is returned when a service or record does not exist.
	ErrNotFound = errors.New("micro: not found")
	// ErrNoNodes is returned when a service has no node to call.
	ErrNoNodes = errors.New("micro: no nodes available")
)
