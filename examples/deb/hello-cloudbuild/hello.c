#include <stdio.h>

int main(void)
{
    puts("hello from a package cloudbuild built");
    return 0;
}
