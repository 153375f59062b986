// A Go program whose HTTP calls are made from C (cgo) and from Go: `go_cgo_client PORT`.
//
// After a line on stdin it GETs http://127.0.0.1:PORT/cgo with C's connect/write/read (on the
// M's system stack, where R14 is not the calling goroutine's g), then /go with net/http, and
// prints "done". Weft must give the C call no goroutine id (0) and the Go call its goroutine's.
package main

/*
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static int get(int port, const char *path) {
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = {0};
	a.sin_family = AF_INET;
	a.sin_port = htons(port);
	a.sin_addr.s_addr = htonl(0x7f000001);
	if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
		return -1;
	char req[256];
	int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: cgo\r\nConnection: close\r\n\r\n", path);
	if (write(fd, req, n) != n)
		return -1;
	char buf[4096];
	int total = 0, r;
	while ((r = read(fd, buf, sizeof buf)) > 0)
		total += r;
	close(fd);
	return total;
}
*/
import "C"

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"unsafe"
)

func main() {
	port, _ := strconv.Atoi(os.Args[1])
	bufio.NewReader(os.Stdin).ReadString('\n')
	path := C.CString("/cgo")
	defer C.free(unsafe.Pointer(path))
	if C.get(C.int(port), path) <= 0 {
		fmt.Println("cgo call failed")
		os.Exit(1)
	}
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/go", port))
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	fmt.Println("done")
}
